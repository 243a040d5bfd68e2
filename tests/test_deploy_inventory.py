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
