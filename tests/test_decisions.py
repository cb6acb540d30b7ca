"""Pure logic, table-tested with no server: decisions, conditions and builders."""

from __future__ import annotations

import re
from typing import Any

import pytest
from privatefm_merge.contract import MergeJob, MergeResult
from privatefm_operator import builders, conditions, decisions
from privatefm_operator.api import LearnerNamespaceSpec, MergePhase, MergeTrigger
from privatefm_operator.settings import Settings


@pytest.mark.parametrize(("last", "current", "expected"), [
    (None, None, 1), (0, None, 1), (3, None, 4), (3, 5, 6), (7, 5, 8),
])
def test_next_version_is_monotonic(last: int | None, current: int | None, expected: int) -> None:
    assert decisions.next_version(last, current) == expected


@pytest.mark.parametrize(("latest", "base", "lag"), [(None, 1, None), (4, None, None), (4, 1, 3), (5, 1, 4),
                                                      (1, 3, 0)])
def test_version_lag(latest: int | None, base: int | None, lag: int | None) -> None:
    assert decisions.version_lag(latest, base) == lag


@pytest.mark.parametrize(("requested", "current", "pinned", "latest", "expected"), [
    (2, 1, 3, 4, 2), (None, 1, 3, 4, 1), (None, None, 3, 4, 3), (None, None, None, 4, 4),
    (None, None, None, None, None),
])
def test_base_version_for_run(requested: int | None, current: int | None, pinned: int | None,
                              latest: int | None, expected: int | None) -> None:
    assert decisions.base_version_for_run(requested, current, pinned, latest) == expected


@pytest.mark.parametrize(("current", "candidate", "advance"), [(None, 1, True), (1, 2, True), (3, 2, False),
                                                                (2, 2, False)])
def test_checkpoint_never_moves_back(current: int | None, candidate: int, advance: bool) -> None:
    assert decisions.should_advance(current, candidate) is advance


OK = MergeResult(status="Succeeded", version=1, manifest_sha256="a" * 64).to_json()
BAD = MergeResult(status="Failed", reason="ShapeMismatch", message="q_proj: 64x4 vs 48x4").to_json()


def cond(type_: str, reason: str = "") -> dict[str, Any]:
    return {"type": type_, "status": "True", "reason": reason}


@pytest.mark.parametrize(("status", "message", "phase", "reason"), [
    ({}, None, MergePhase.PENDING, "Pending"),
    ({"active": 1}, None, MergePhase.RUNNING, "Running"),
    ({"conditions": [cond("Complete")]}, OK, MergePhase.SUCCEEDED, "Merged"),
    ({"conditions": [cond("SuccessCriteriaMet"), cond("Complete")]}, OK, MergePhase.SUCCEEDED, "Merged"),
    ({"conditions": [cond("Complete")]}, None, MergePhase.FAILED, "ResultMissing"),
    ({"conditions": [cond("Complete")]}, "not json", MergePhase.FAILED, "ResultMissing"),
    ({"conditions": [cond("Complete")]}, BAD, MergePhase.FAILED, "ResultMissing"),
    ({"conditions": [cond("Failed", "BackoffLimitExceeded")]}, BAD, MergePhase.FAILED, "ShapeMismatch"),
    ({"conditions": [cond("Failed", "DeadlineExceeded")]}, None, MergePhase.FAILED, "DeadlineExceeded"),
    ({"conditions": [cond("FailureTarget", "BackoffLimitExceeded")]}, None, MergePhase.FAILED,
     "BackoffLimitExceeded"),
])
def test_job_outcome(status: dict[str, Any], message: str | None, phase: MergePhase, reason: str) -> None:
    outcome = decisions.job_outcome(status, message)
    assert (outcome.phase, outcome.reason) == (phase, reason)
    assert decisions.job_finished(status) is (phase in (MergePhase.SUCCEEDED, MergePhase.FAILED))


@pytest.mark.parametrize(("claimed", "actual", "version", "bad", "accepted", "needle"), [
    ("a" * 64, "a" * 64, 1, [], True, "verified"),
    ("a" * 64, "a" * 64, 1, ["model-00001-of-00002.safetensors"], False, "model-00001"),
    ("a" * 64, "b" * 64, 1, [], False, "differs"),
    ("a" * 64, "a" * 64, 2, [], False, "version 2"),
])
def test_accept_checkpoint(claimed: str, actual: str, version: int, bad: list[str], accepted: bool,
                           needle: str) -> None:
    result = MergeResult(status="Succeeded", version=1, manifest_sha256=claimed)
    verdict = decisions.accept_checkpoint(result, 1, actual, version, bad)
    assert verdict.accepted is accepted and needle in verdict.message


def test_condition_transition_time_changes_only_with_status() -> None:
    first = conditions.merge([], [conditions.condition("Ready", False, "Provisioning", "", 1)], at="t1")
    same = conditions.merge(first, [conditions.condition("Ready", False, "StillProvisioning", "x", 2)], at="t2")
    assert same[0]["lastTransitionTime"] == "t1" and same[0]["reason"] == "StillProvisioning"
    flipped = conditions.merge(same, [conditions.condition("Ready", True, "Provisioned", "", 2)], at="t3")
    assert flipped[0]["lastTransitionTime"] == "t3"
    degraded = conditions.condition("Degraded", False, "WithinLag", "", 2) | {"lastTransitionTime": "t0"}
    kept = conditions.merge([*flipped, degraded], [conditions.condition("Ready", True, "Provisioned", "", 3)],
                            at="t4")
    assert [c["type"] for c in kept] == ["Ready", "Degraded"] and kept[1]["lastTransitionTime"] == "t0"


# ---- builders --------------------------------------------------------------------------------
SPEC = LearnerNamespaceSpec.model_validate({
    "learnerId": "ada", "baseModel": {"name": "tiny-llama"}, "guardians": [{"kind": "User", "name": "p"}],
    "merge": {"gpus": 2, "nodeSelector": {"gpu": "a100"}, "tolerations": [{"key": "gpu", "operator": "Exists"}],
              "timeZone": "Europe/Berlin"}})
LEARNER = builders.Learner(name="learner-ada", uid="uid-1", ns_uid="abcdef123456", namespace="lrn-ada-abcdef12",
                           spec=SPEC)
SETTINGS = Settings(s3_endpoint="http://10.1.2.3:9000", merge_image="example/merge:1")


def test_namespace_is_restricted_and_not_owned() -> None:
    ns = builders.namespace(LEARNER)
    assert "ownerReferences" not in ns["metadata"]
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert all(c["metadata"]["ownerReferences"][0]["uid"] == "uid-1" for c in builders.children(LEARNER, SETTINGS))


@pytest.mark.parametrize(("endpoint", "override", "to", "port"), [
    ("http://10.1.2.3:9000", "", [{"ipBlock": {"cidr": "10.1.2.3/32"}}], 9000),
    ("https://s3.example.internal", "", None, 443),
    ("https://s3.example.internal", "10.0.0.0/8", [{"ipBlock": {"cidr": "10.0.0.0/8"}}], 443),
    ("http://[fd00::5]:80", "", [{"ipBlock": {"cidr": "fd00::5/128"}}], 80),
])
def test_s3_egress(endpoint: str, override: str, to: list[dict[str, Any]] | None, port: int) -> None:
    rule = builders.s3_egress(endpoint, override)
    assert rule.get("to") == to and rule["ports"] == [{"protocol": "TCP", "port": port}]


def test_cronjob_follows_the_spec() -> None:
    cron = builders.cronjob(LEARNER, SETTINGS)["spec"]
    assert cron["timeZone"] == "Europe/Berlin" and cron["concurrencyPolicy"] == "Forbid"
    pod = cron["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"gpu": "a100"} and pod["tolerations"] == [{"key": "gpu", "operator": "Exists"}]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert container["image"] == "example/merge:1"
    assert {"name": "PRIVATEFM_DEVICE", "value": "cuda"} in container["env"]
    assert builders.resource_quota(LEARNER, SETTINGS)["spec"]["hard"]["requests.nvidia.com/gpu"] == "2"


def test_job_parameters_reach_the_merge_contract_through_the_downward_api() -> None:
    """Builder annotations + fieldRef env, resolved as the kubelet would, give back the same MergeJob."""
    job = MergeJob(base_uri="s3://b/base/tiny-llama/v1", adapter_uri="s3://b/learners/x/adapters/3",
                   output_uri="s3://b/learners/x/checkpoints/v7", base_model="tiny-llama", base_version=1,
                   parent_version=6, target_version=7, device="cpu")
    annotations = builders.job_params(job)
    spec = builders.merge_job(LEARNER, SETTINGS, "run", MergeTrigger.MANUAL, annotations, {})["spec"]
    env: dict[str, str] = {}
    for var in spec["template"]["spec"]["containers"][0]["env"]:
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            path = var["valueFrom"]["fieldRef"]["fieldPath"]
            key = re.fullmatch(r"metadata\.annotations\['(.+)'\]", path)
            assert key, path
            env[var["name"]] = spec["template"]["metadata"]["annotations"][key.group(1)]
    env["PRIVATEFM_DEVICE"] = "cpu"
    assert MergeJob.from_env(env) == job
    assert env["PRIVATEFM_RESULT_PATH"] == spec["template"]["spec"]["containers"][0]["terminationMessagePath"]
