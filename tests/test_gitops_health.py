"""Argo CD health (manifests/argocd/health.lua, run in Lua 5.1 as Argo CD runs it) and kstatus (a
faithful port of cli-utils' Compute) agree on every status captured from the suite
(tests/data/statuses/, written by tests/test_health_e2e.py with PRIVATEFM_CAPTURE_STATUSES set)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from privatefm_testing import kstatus
from privatefm_testing.gitops import EXPECTED, HEALTH_LUA, KSTATUS_OF, REPO, STATUSES, lua_health

pytest.importorskip("lupa")
CASES = sorted(STATUSES.glob("*.json"))


def test_every_expected_case_was_captured() -> None:
    assert {p.stem for p in CASES} >= set(EXPECTED) - {"merge-running", "merge-pending"}, \
        "rerun tests/test_health_e2e.py with PRIVATEFM_CAPTURE_STATUSES=tests/data/statuses"


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_argo_cd_and_kstatus_agree(path: Path) -> None:
    obj = json.loads(path.read_text())
    health, message = lua_health(obj)
    computed = kstatus.compute(obj)
    assert computed.status in KSTATUS_OF[health], (health, message, computed)
    assert health == EXPECTED[path.stem], (health, message)
    assert message


def test_no_status_and_just_planned_read_as_progressing() -> None:
    for name in ("learner-no-status", "merge-no-status", "merge-planned"):
        obj = json.loads((STATUSES / f"{name}.json").read_text())
        assert lua_health(obj)[0] == "Progressing"
        assert kstatus.compute(obj).status == kstatus.IN_PROGRESS


def test_the_api_server_never_serves_an_object_without_a_status() -> None:
    """kstatus reads an object with no status at all as Current (it skips the generation check);
    the CRDs default status to observedGeneration 0, so what the API server serves is InProgress."""
    bare: dict[str, Any] = {"apiVersion": "privatefm.io/v1alpha1", "kind": "AdapterMerge",
                            "metadata": {"name": "x", "generation": 1}}
    assert kstatus.compute(bare).status == kstatus.CURRENT  # why the default exists
    assert lua_health(bare)[0] == "Progressing"              # Argo CD does not wait on it
    for crd in (REPO / "crds").glob("privatefm.io_*.yaml"):
        schema = yaml.safe_load(crd.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        assert schema["properties"]["status"]["default"] == {"observedGeneration": 0}, crd.name
    served = json.loads((STATUSES / "merge-no-status.json").read_text())
    assert served["status"] == {"observedGeneration": 0}


@pytest.mark.parametrize(("conditions", "generation", "observed", "health", "ks"), [
    ([], 1, 1, "Healthy", "Current"),
    ([("Ready", "True")], 2, 1, "Progressing", "InProgress"),
    ([("Ready", "Unknown")], 1, 1, "Progressing", "InProgress"),
    ([("Stalled", "True"), ("Reconciling", "True")], 1, 1, "Degraded", "Failed"),  # list order decides
    ([("Reconciling", "True"), ("Stalled", "True")], 1, 1, "Progressing", "InProgress"),
    ([("Ready", "True"), ("Stalled", "False"), ("Reconciling", "False")], 1, 1, "Healthy", "Current"),
])
def test_the_rules_agree_beyond_the_captures(conditions: list[tuple[str, str]], generation: int, observed: int,
                                             health: str, ks: str) -> None:
    obj = {"kind": "LearnerNamespace", "metadata": {"name": "x", "generation": generation},
           "status": {"observedGeneration": observed,
                      "conditions": [{"type": t, "status": s, "reason": "R", "message": "m"} for t, s in conditions]}}
    assert (lua_health(obj)[0], kstatus.compute(obj).status) == (health, ks)


def test_a_deleted_object_is_progressing_and_terminating() -> None:
    obj = {"kind": "LearnerNamespace",
           "metadata": {"name": "x", "generation": 1, "deletionTimestamp": "2026-01-01T00:00:00Z"},
           "status": {"observedGeneration": 1, "conditions": [{"type": "Ready", "status": "True"}]}}
    assert (lua_health(obj)[0], kstatus.compute(obj).status) == ("Progressing", "Terminating")


def test_the_argocd_snippet_ships_the_script_for_both_kinds() -> None:
    snippet = yaml.safe_load((REPO / "manifests" / "argocd" / "argocd-cm-health.yaml").read_text())
    script = HEALTH_LUA.read_text()
    for kind in ("LearnerNamespace", "AdapterMerge"):
        assert snippet["data"][f"resource.customizations.health.privatefm.io_{kind}"] == script
    docs = (REPO / "docs" / "gitops.md").read_text()
    assert "resource.customizations.health.privatefm.io_LearnerNamespace" in docs
