"""The deploy's pre-flight: bad inventories fail with a message that names the problem,
before anything is changed on any host (pyinfra/goml_inventory.py, and deploy.py through
the real pyinfra CLI with its @fake connector)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
PYINFRA_DIR = REPO / "pyinfra"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, PYINFRA_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


gi = _load("goml_inventory")


def host(name: str, **overrides: Any) -> tuple[str, dict[str, Any]]:
    data: dict[str, Any] = {
        "goml_node": name,
        "goml_cloud": "aws",
        "goml_region": "us-east-1",
        "goml_roles": ["control", "agent"],
        "goml_address": f"10.0.0.{len(name) + sum(map(ord, name)) % 200}",
    }
    data.update(overrides)
    return name, {k: v for k, v in data.items() if v is not None}


def five() -> list[tuple[str, dict[str, Any]]]:
    return [
        host("aws-1", goml_address="10.0.0.1"),
        host("aws-2", goml_address="10.0.0.2"),
        host("aws-3", goml_address="10.0.0.3"),
        host("gcp-1", goml_cloud="gcp", goml_region="us-central1", goml_address="10.0.1.1"),
        host("gcp-2", goml_cloud="gcp", goml_region="us-central1", goml_address="10.0.1.2"),
    ]


def test_reference_topology_plans() -> None:
    plan = gi.plan_cluster(five())
    assert [n.node for n in plan.control] == ["aws-1", "aws-2", "aws-3", "gcp-1", "gcp-2"]
    assert plan.peers()["gcp-2"] == "10.0.1.2:7000"
    assert plan.warnings == ()
    assert plan.settings["goml_election_timeout_ms_min"] == 300
    aws1, gcp1 = plan.by_host("aws-1"), plan.by_host("gcp-1")
    assert gi.latency_bound_ms(aws1, plan.by_host("aws-2")) == 5.0
    assert gi.latency_bound_ms(aws1, gcp1) == 100.0


def test_reference_inventory_file_is_valid() -> None:
    namespace: dict[str, Any] = {}
    path = PYINFRA_DIR / "inventories" / "reference.py"
    exec(compile(path.read_text(), str(path), "exec"), namespace)
    plan = gi.plan_cluster(namespace["aws"] + namespace["gcp"])
    assert {n.cloud for n in plan.nodes} == {"aws", "gcp"}
    assert len(plan.control) == 5


@pytest.mark.parametrize("field", gi.REQUIRED)
def test_missing_field_is_named(field: str) -> None:
    hosts = five()
    del hosts[2][1][field]
    with pytest.raises(gi.InventoryError, match=rf"host aws-3: missing {field}\b") as error:
        gi.plan_cluster(hosts)
    assert "nothing was changed on any host" in str(error.value)


def test_duplicate_node_names() -> None:
    hosts = five()
    hosts[4][1]["goml_node"] = "gcp-1"
    with pytest.raises(
        gi.InventoryError, match="duplicate node name 'gcp-1' on hosts gcp-1 and gcp-2"
    ):
        gi.plan_cluster(hosts)


def test_duplicate_addresses() -> None:
    hosts = five()
    hosts[1][1]["goml_address"] = "10.0.0.1"
    with pytest.raises(
        gi.InventoryError, match=re.escape("hosts aws-1 and aws-2 share the address 10.0.0.1:7000")
    ):
        gi.plan_cluster(hosts)


def test_even_number_of_control_nodes_warns() -> None:
    hosts = five()
    hosts[4][1]["goml_roles"] = ["agent"]
    plan = gi.plan_cluster(hosts)
    assert len(plan.control) == 4
    assert len(plan.warnings) == 1 and "4 control nodes is an even number" in plan.warnings[0]


def test_no_control_node_is_an_error() -> None:
    hosts = [host(name, goml_roles=["agent"]) for name in ("a-1", "a-2")]
    with pytest.raises(gi.InventoryError, match="no host has the role control"):
        gi.plan_cluster(hosts)


def test_several_problems_are_all_listed() -> None:
    hosts = five()
    hosts[0][1]["goml_roles"] = ["control", "gpu"]
    hosts[1][1]["goml_port"] = "http"
    hosts[2][1]["goml_node"] = "Bad_Name"
    with pytest.raises(gi.InventoryError) as error:
        gi.plan_cluster(hosts)
    message = str(error.value)
    assert "host aws-1: unknown role(s) gpu" in message
    assert "host aws-2: goml_port must be an integer, got 'http'" in message
    assert "host aws-3: goml_node 'Bad_Name' must be lowercase" in message


def test_cluster_wide_settings_must_agree_and_be_ordered() -> None:
    hosts = five()
    hosts[0][1]["goml_cluster_id"] = "a"
    hosts[3][1]["goml_cluster_id"] = "b"
    with pytest.raises(
        gi.InventoryError, match="goml_cluster_id differs between hosts: 'a' on aws-1, 'b' on gcp-1"
    ):
        gi.plan_cluster(hosts)
    hosts = five()
    hosts[0][1]["goml_heartbeat_interval_ms"] = 400
    with pytest.raises(gi.InventoryError, match="need goml_heartbeat_interval_ms < goml_election"):
        gi.plan_cluster(hosts)


def test_empty_inventory() -> None:
    with pytest.raises(gi.InventoryError, match="the inventory has no hosts"):
        gi.plan_cluster([])


def test_unreachable_hosts_are_named() -> None:
    gi.check_reachable(["a", "b"], ["b", "a"])
    with pytest.raises(
        gi.InventoryError, match=r"unreachable host\(s\): c, d \(pyinfra could not connect"
    ):
        gi.check_reachable(["a", "c", "d"], ["a"])


def test_hosts_without_systemd_are_named() -> None:
    gi.check_systemd({"a": True, "b": True})
    with pytest.raises(
        gi.InventoryError, match=r"without systemd as PID 1 \(no /run/systemd/system\): b"
    ):
        gi.check_systemd({"a": True, "b": False})


# ------------------------------------------------------------------ membership

FIVE = ("aws-1", "aws-2", "aws-3", "gcp-1", "gcp-2")


def test_unchanged_inventory_changes_no_membership() -> None:
    plan = gi.plan_cluster(five())
    change = gi.plan_membership(plan, FIVE, ())
    assert change.empty and change.describe() == "no change"


def test_new_host_is_added_and_a_learner_promoted() -> None:
    hosts = [*five(), host("aws-4", goml_address="10.0.0.4")]
    plan = gi.plan_cluster(hosts)
    assert [n.node for n in gi.plan_membership(plan, FIVE, ()).add] == ["aws-4"]
    # A learner left by an interrupted run is promoted (Operator.add resumes there).
    change = gi.plan_membership(plan, FIVE, ("aws-4",))
    assert [n.endpoint for n in change.add] == ["10.0.0.4:7000"] and change.remove == ()


def test_replace_adds_first_then_removes_the_retired_host() -> None:
    hosts = five()
    hosts[2] = ("aws-3", {"goml_node": "aws-3", "goml_retire": True})  # only the name needed
    hosts.append(host("aws-4", goml_address="10.0.0.4"))
    plan = gi.plan_cluster(hosts)
    assert [n.node for n in plan.control] == ["aws-1", "aws-2", "gcp-1", "gcp-2", "aws-4"]
    assert plan.retired_host("aws-3") == gi.RetiredSpec("aws-3", "aws-3")
    change = gi.plan_membership(plan, FIVE, ())
    assert change.describe() == "add aws-4, remove aws-3"
    assert change.unmanaged == ()
    # Run again once done: nothing left to change.
    assert gi.plan_membership(plan, ("aws-1", "aws-2", "gcp-1", "gcp-2", "aws-4"), ()).empty


def test_a_member_no_host_names_is_removed_but_not_in_a_limited_run() -> None:
    plan = gi.plan_cluster(five()[:4])
    change = gi.plan_membership(plan, FIVE, ())
    assert change.remove == ("gcp-2",) and change.unmanaged == ("gcp-2",)
    # --limit aws-1: the run cannot tell gcp-2 left out from gcp-2 deleted.
    assert gi.plan_membership(plan, FIVE, (), limit={"aws-1"}).empty


def test_a_limited_run_adds_only_its_hosts() -> None:
    plan = gi.plan_cluster([*five(), host("aws-4", goml_address="10.0.0.4")])
    assert gi.plan_membership(plan, FIVE, (), limit={"aws-1"}).empty
    assert gi.plan_membership(plan, FIVE, (), limit={"aws-4"}).describe() == "add aws-4"


def test_host_no_longer_control_is_removed() -> None:
    hosts = five()
    hosts[4][1]["goml_roles"] = ["agent"]
    change = gi.plan_membership(gi.plan_cluster(hosts), FIVE, ())
    assert change.remove == ("gcp-2",) and change.unmanaged == ()


def test_removing_a_majority_at_once_is_refused() -> None:
    plan = gi.plan_cluster(five()[:2])  # three of five hosts gone from the inventory
    with pytest.raises(gi.InventoryError) as error:
        gi.plan_membership(plan, FIVE, ())
    message = str(error.value)
    assert "would remove 3 of the 5 voters (aws-3, gcp-1, gcp-2) and keep 2" in message
    assert "Nothing was changed on any host" in message
    # Two of five (keeping three), or one at a time, is accepted.
    assert gi.plan_membership(gi.plan_cluster(five()[:3]), FIVE, ()).remove == ("gcp-1", "gcp-2")
    assert gi.plan_membership(gi.plan_cluster(five()[:1]), ("aws-1", "aws-2"), ()).remove == (
        "aws-2",
    )


def test_retired_host_needs_its_node_name() -> None:
    hosts = [*five(), ("old-1", {"goml_retire": "yes"})]
    with pytest.raises(gi.InventoryError, match="host old-1: goml_retire needs goml_node"):
        gi.plan_cluster(hosts)
    hosts = [*five(), ("old-1", {"goml_retire": True, "goml_node": "aws-1"})]
    with pytest.raises(gi.InventoryError, match="duplicate node name 'aws-1'"):
        gi.plan_cluster(hosts)


def test_a_deployed_node_keeps_its_peers_and_join() -> None:
    text = "node_id: aws-4\nlisten: 10.0.0.4:7000\npeers:\n  aws-1: 10.0.0.1:7000\n  aws-4: 10.0.0.4:7000\njoin: true\n"
    assert gi.kept_membership(text, "aws-4") == (
        {"aws-1": "10.0.0.1:7000", "aws-4": "10.0.0.4:7000"},
        True,
    )
    assert gi.kept_membership(text.replace("join: true\n", ""), "aws-4") is not None
    assert gi.kept_membership(text, "aws-5") is None  # another node's config: not kept
    for nothing in (None, "", "  \n", "{not yaml", "- a list\n"):
        assert gi.kept_membership(nothing, "aws-4") is None


def test_a_new_nodes_certificate_comes_from_the_clusters_ca(tmp_path: Path) -> None:
    from cryptography import x509

    goml_build = _load("goml_build")
    certs = goml_build.credentials(tmp_path, ("aws-1", "aws-2"), ("10.0.0.1", "10.0.0.2"))
    ca_before = (certs / "ca.pem").read_bytes()
    goml_build.credentials(
        tmp_path,
        ("aws-1", "aws-4"),
        ("10.0.0.1", "10.0.0.4"),
        node_addresses=(("aws-1", "10.0.0.1"), ("aws-4", "10.0.0.4")),
        retired=("aws-2",),
    )
    assert (certs / "ca.pem").read_bytes() == ca_before  # the same CA, not a new one
    ca = x509.load_pem_x509_certificate(ca_before)
    new = x509.load_pem_x509_certificate((certs / "aws-4.pem").read_bytes())
    new.verify_directly_issued_by(ca)
    names = new.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "10.0.0.4" in {str(ip) for ip in names.get_values_for_type(x509.IPAddress)}
    # A state directory that knows none of the inventory's nodes is another cluster's.
    with pytest.raises(goml_build.BuildError, match="belongs to another cluster"):
        goml_build.credentials(tmp_path, ("x-1",), ("10.0.9.1",))


@pytest.mark.skipif(importlib.util.find_spec("pyinfra.api") is None, reason="pyinfra not installed")
def test_deploy_stops_on_a_bad_inventory_before_any_operation(tmp_path: Path) -> None:
    inventory = tmp_path / "inventory.py"
    inventory.write_text(
        "aws = [\n"
        "    ('@fake/aws-1', {'goml_node': 'aws-1', 'goml_cloud': 'aws', 'goml_region': 'r',"
        " 'goml_roles': ['control'], 'goml_address': '10.0.0.1'}),\n"
        "    ('@fake/aws-2', {'goml_node': 'aws-1', 'goml_cloud': 'aws', 'goml_region': 'r',"
        " 'goml_roles': ['control'], 'goml_address': '10.0.0.2'}),\n"
        "    ('@fake/aws-3', {'goml_node': 'aws-3', 'goml_region': 'r',"
        " 'goml_roles': ['control'], 'goml_address': '10.0.0.3'}),\n"
        "]\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "pyinfra", "-y", str(inventory), str(PYINFRA_DIR / "deploy.py")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0
    assert "invalid goml inventory (nothing was changed on any host)" in result.stdout
    assert "host @fake/aws-3: missing goml_cloud" in result.stdout
    assert "duplicate node name 'aws-1' on hosts @fake/aws-1 and @fake/aws-2" in result.stdout
    assert "--> Results:" not in result.stdout
