"""The reference setup: 3 control+agent nodes in AWS us-east-1 (t4g, arm64) and 2 in GCP
us-central1 (e2, amd64). Replace the addresses with your VMs'.

    pyinfra -y pyinfra/inventories/reference.py pyinfra/deploy.py

The wheelhouse is chosen per host from its facts (architecture, Python), so the mixed
architectures need no setting here. goml_address is the private address peers and
agents use (put the clouds on one network: VPN or peering), ssh_hostname where pyinfra
connects.
"""

_common = {
    "ssh_user": "admin",
    "_sudo": True,
    "goml_roles": ["control", "agent"],
    "goml_cluster_id": "goml-prod",
    "goml_election_timeout_ms_min": 300,
    "goml_election_timeout_ms_max": 600,
    "goml_heartbeat_interval_ms": 50,
}


def _node(name: str, cloud: str, region: str, address: str, cpu: float, memory_mb: int):
    return (
        name,
        {
            **_common,
            "ssh_hostname": address,
            "goml_node": name,
            "goml_cloud": cloud,
            "goml_region": region,
            "goml_address": address,
            "goml_capacity_cpu": cpu,
            "goml_capacity_memory_mb": memory_mb,
        },
    )


aws = [
    _node("aws-1", "aws", "us-east-1", "10.10.1.11", 2.0, 3584),  # t4g.medium, arm64
    _node("aws-2", "aws", "us-east-1", "10.10.2.11", 2.0, 3584),
    _node("aws-3", "aws", "us-east-1", "10.10.3.11", 2.0, 3584),
]
gcp = [
    _node("gcp-1", "gcp", "us-central1", "10.20.1.11", 2.0, 3584),  # e2-medium, amd64
    _node("gcp-2", "gcp", "us-central1", "10.20.1.12", 2.0, 3584),
]
