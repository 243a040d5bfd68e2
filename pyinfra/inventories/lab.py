"""Inventory of the local lab (pyinfra/lab.py): five containers on 10.200.0.0/24.

GOML_LAB_STATE names the lab's lab.json (written by `python pyinfra/lab.py up`).
GOML_LAB_OVERRIDES (optional JSON {host: {key: value}}) changes host data, as the
tests do to prove that one changed setting restarts only what it must.
GOML_LAB_EXTRA (optional JSON list of {name, cloud, region, address}) adds hosts, as
the tests do to prove that an unreachable host stops the deploy before any change.
GOML_LAB_SKIP (optional JSON list of host names) leaves lab hosts out (a host deleted
from the inventory). Hosts made later (`python pyinfra/lab.py add NAME`) are in it
as soon as they exist; {"aws-3": {"goml_retire": true}} in GOML_LAB_OVERRIDES retires one.
"""

import json
import os
from pathlib import Path

_state = json.loads(Path(os.environ["GOML_LAB_STATE"]).read_text())
_overrides = json.loads(os.environ.get("GOML_LAB_OVERRIDES") or "{}")
_cache = Path(os.environ.get("GOML_LAB_CACHE", "/var/cache/goml-lab"))


def _host(entry: dict) -> tuple[str, dict]:
    data = {
        "ssh_hostname": entry["address"],
        "ssh_user": "root",
        "ssh_key": _state["key"],
        "ssh_known_hosts_file": _state["known_hosts"],
        "ssh_strict_host_key_checking": "off",
        "goml_node": entry["name"],
        "goml_cloud": entry["cloud"],
        "goml_region": entry["region"],
        "goml_roles": ["control", "agent"],
        "goml_address": entry["address"],
        "goml_capacity_cpu": 1.0,
        "goml_capacity_memory_mb": 512,
        "goml_state_dir": str(Path(_state["dir"]) / "cluster-state"),
        "goml_build_dir": str(_cache / "build"),
        "goml_verify_timeout_s": 60,
    }
    data.update(_overrides.get(entry["name"], {}))
    return entry["name"], data


_skip = set(json.loads(os.environ.get("GOML_LAB_SKIP") or "[]"))
_hosts = [h for h in _state["hosts"] if h["name"] not in _skip]
_hosts += json.loads(os.environ.get("GOML_LAB_EXTRA") or "[]")
aws = [_host(h) for h in _hosts if h["cloud"] == "aws"]
gcp = [_host(h) for h in _hosts if h["cloud"] == "gcp"]
