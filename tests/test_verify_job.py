"""The deep check's building blocks: the verify Job, its read-only credentials, and its verdict.

Pure parts first (the Job as built, the session policy, the verdict, the CLI's result file); then
end to end on the real control plane and MinIO: a learner's checkpoint from a real merge, checked by
``VerifyChecks`` (as the operator's own ServiceAccount, under the shipped RBAC and admission
policies) with a verify Job that the pod runner runs, before and after one byte of a shard flips.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from kubernetes import config as kube_config
from privatefm_merge import layout
from privatefm_merge.cli import main as merge_cli
from privatefm_merge.contract import MAX_RESULT_BYTES, VerifyResult
from privatefm_operator import builders, naming
from privatefm_operator.api import LearnerNamespace, LearnerNamespaceSpec
from privatefm_operator.deep_check import JOB_FAILED, JOB_LOST, VerifyOutcome, outcome_of
from privatefm_operator.kube import Kube as OperatorKube
from privatefm_operator.reconcilers.base import Clients
from privatefm_operator.reconcilers.learner import learner_of
from privatefm_operator.reconcilers.verify import VerifyChecks, VerifyConflict
from privatefm_operator.settings import Settings
from privatefm_operator.storage import Storage
from privatefm_operator.store_policy import verify_session_policy
from privatefm_testing.cluster import S3Info
from privatefm_testing.kube import Kube, wait_for
from test_operator import LearnerHandle, learner  # noqa: F401  (learner: the fixture, run by the session's operator)

UID = "3f1c2a9e04b7"
CKPT = layout.checkpoint_prefix(UID, 12)
URI = layout.s3_uri("privatefm", CKPT)
DONE = {"conditions": [{"type": "Complete", "status": "True"}], "succeeded": 1}
FAILED = {"conditions": [{"type": "Failed", "status": "True", "reason": "DeadlineExceeded",
                          "message": "Job was active longer than specified deadline"}], "failed": 1}


def _learner() -> builders.Learner:
    spec = LearnerNamespaceSpec.model_validate({
        "learnerId": "bo", "baseModel": {"name": "tiny-llama"}, "guardians": [{"kind": "User", "name": "p"}],
        "merge": {"gpus": 1, "nodeSelector": {"gpu": "a100"},
                  "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}})
    return builders.Learner("learner-bo", UID, "lrn-bo-3f1c2a9e", spec)


# ---- 1. pure -----------------------------------------------------------------------------------
def test_verify_session_policy_is_read_only_on_one_checkpoint() -> None:
    assert verify_session_policy("privatefm", f"/{CKPT}/") == {"Version": "2012-10-17", "Statement": [
        {"Sid": "ReadCheckpoint", "Effect": "Allow", "Action": ["s3:GetObject"],
         "Resource": [f"arn:aws:s3:::privatefm/{CKPT}/*"]},
        {"Sid": "ListOwnPrefixes", "Effect": "Allow", "Action": ["s3:ListBucket"],
         "Resource": ["arn:aws:s3:::privatefm"], "Condition": {"StringLike": {"s3:prefix": [f"{CKPT}/*"]}}},
    ]}
    for bad in ("learners/x/checkpoints/v1*", "", "learners/../base"):
        with pytest.raises(ValueError):
            verify_session_policy("privatefm", bad)


def test_verify_job_runs_the_merge_image_on_cpu_restricted_and_tokenless() -> None:
    settings = Settings(merge_image="reg/merge:1", merge_gpus=1)
    job = builders.verify_job(_learner(), settings, "verify-v12-1", 12, URI, naming.verify_secret("verify-v12-1"))
    meta, spec = job["metadata"], job["spec"]
    assert meta["namespace"] == "lrn-bo-3f1c2a9e" and "ownerReferences" not in meta
    assert meta["labels"][naming.LABEL_MANAGED_BY] == naming.MANAGED_BY
    assert meta["labels"][naming.LABEL_COMPONENT] == "verify" and meta["labels"][naming.LABEL_VERSION] == "12"
    assert naming.LABEL_TRIGGER not in meta["labels"]  # never mistaken for a scheduled merge
    assert spec["suspend"] is True and spec["backoffLimit"] == 0
    assert spec["activeDeadlineSeconds"] == builders.VERIFY_DEADLINE_SECONDS and spec["ttlSecondsAfterFinished"] > 0
    pod = spec["template"]["spec"]
    assert spec["template"]["metadata"]["labels"] == meta["labels"]  # the pod runner and NetworkPolicy see it
    assert pod["automountServiceAccountToken"] is False and pod["serviceAccountName"] == naming.MERGE_SERVICE_ACCOUNT
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["restartPolicy"] == "Never" and pod["enableServiceLinks"] is False
    assert "nodeSelector" not in pod and "tolerations" not in pod  # not the merge's GPU nodes
    [container] = pod["containers"]
    assert container["image"] == "reg/merge:1"
    assert container["command"] == ["privatefm-merge", "verify", URI, "--json", "--result-path", "/dev/termination-log"]
    assert container["terminationMessagePath"] == "/dev/termination-log"
    resources = container["resources"]
    assert not any("gpu" in k for part in resources.values() for k in part), resources
    assert resources["requests"] == resources["limits"] == {"cpu": "1", "memory": "512Mi"}
    assert {"name": "NVIDIA_VISIBLE_DEVICES", "value": "void"} in container["env"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert container["envFrom"] == [{"secretRef": {"name": "privatefm-verify.verify-v12-1"}}]
    assert not any("AWS" in e["name"] for e in container["env"])  # keys only from the Secret


def test_verify_pod_is_valid_whatever_the_merge_cpu_default_of_the_namespace() -> None:
    """The learner's LimitRange gives containers without a CPU limit the merge's CPU as their limit; a
    verify request above it would make every pod of the Job invalid. Each request fits its limit."""
    for merge_cpu in ("250m", "1", "16"):
        settings = Settings(merge_image="reg/merge:1", merge_cpu=merge_cpu)
        job = builders.verify_job(_learner(), settings, "verify-v1-1", 1, URI, naming.verify_secret("verify-v1-1"))
        resources = job["spec"]["template"]["spec"]["containers"][0]["resources"]
        assert set(resources["requests"]) <= set(resources["limits"])
        assert resources["limits"]["cpu"] == resources["requests"]["cpu"]


def _result(**fields: Any) -> str:
    return VerifyResult(uri=URI, manifest_sha256="m" * 64, **fields).to_json()


@pytest.mark.parametrize(("status", "message", "expected"), [
    ({"active": 1}, None, None),
    (DONE, _result(status="Passed", message="3 files sha256-verified"),
     VerifyOutcome(True, None, None, "3 files sha256-verified", "m" * 64)),
    (FAILED, _result(status="Failed", reason="ChecksumMismatch", file="model-00001-of-00002.safetensors",
                     message="bad file model-00001-of-00002.safetensors: sha256 mismatch"),
     VerifyOutcome(False, "ChecksumMismatch", "model-00001-of-00002.safetensors",
                   "bad file model-00001-of-00002.safetensors: sha256 mismatch", "m" * 64)),
    (FAILED, None, VerifyOutcome(False, JOB_FAILED, None,
                                 "the verify Job ended without a result: Job was active longer than specified "
                                 "deadline")),
])
def test_outcome_of(status: dict[str, Any], message: str | None, expected: VerifyOutcome | None) -> None:
    got = outcome_of(status, message, URI)
    assert got == expected
    assert got is None or got.corrupt == (got.reason == "ChecksumMismatch")


@pytest.mark.parametrize("message", ["not json", _result(status="Failed", reason="StorageError", message="denied"),
                                     VerifyResult(status="Passed", uri=layout.s3_uri("privatefm", "learners/x/"
                                                                                     "checkpoints/v1")).to_json()])
def test_outcome_that_says_nothing_about_the_checkpoint(message: str) -> None:
    """Unreadable, a store it could not read, or a report about another checkpoint: not corruption."""
    got = outcome_of(FAILED, message, URI)
    assert got is not None and not got.passed and not got.corrupt, got


def test_outcome_checks_the_manifest_against_the_accepted_one() -> None:
    passed = _result(status="Passed", message="ok")
    assert outcome_of(DONE, passed, URI, expected_manifest_sha256="m" * 64) == VerifyOutcome(
        True, None, None, "ok", "m" * 64)
    swapped = outcome_of(DONE, passed, URI, expected_manifest_sha256="a" * 64)
    assert swapped is not None and swapped.corrupt
    assert (swapped.reason, swapped.file) == ("ChecksumMismatch", "manifest.json")
    assert not VerifyOutcome(False, JOB_LOST, None, "gone").corrupt


def test_verify_result_fits_a_termination_message() -> None:
    text = VerifyResult(status="Failed", uri=URI, reason="FileMissing", file="a", message="x" * 10_000).to_json()
    assert len(text.encode()) <= MAX_RESULT_BYTES and VerifyResult.from_json(text).message.endswith("[truncated]")


def _checkpoint(root: Path) -> Path:
    from privatefm_merge.seal import seal_checkpoint

    ckpt = root / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    (ckpt / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    seal_checkpoint(str(ckpt), version=1)
    return ckpt


@pytest.mark.parametrize(("damage", "reason", "file"), [
    (None, None, None),
    ("flip", "ChecksumMismatch", "model.safetensors"),
    ("truncate", "SizeMismatch", "model.safetensors"),
    ("delete", "FileMissing", "model.safetensors"),
    ("manifest", "ManifestMissing", "manifest.json"),
])
def test_cli_result_path(tmp_path: Path, damage: str | None, reason: str | None, file: str | None) -> None:
    ckpt = _checkpoint(tmp_path)
    shard = ckpt / "model.safetensors"
    data = bytearray(shard.read_bytes())
    if damage == "flip":
        data[1000] ^= 0x01
        shard.write_bytes(bytes(data))
    elif damage == "truncate":
        shard.write_bytes(bytes(data[:-1]))
    elif damage == "delete":
        shard.unlink()
    elif damage == "manifest":
        (ckpt / "manifest.json").unlink()
    out = tmp_path / "termination-log"
    code = merge_cli(["verify", str(ckpt), "--result-path", str(out)])
    result = VerifyResult.from_json(out.read_text())
    assert code == (0 if damage is None else 1)
    assert result.passed == (damage is None) and result.reason == reason and result.file == file, result
    assert result.uri == str(ckpt)


# ---- 2. end to end -----------------------------------------------------------------------------
def _secret_env(kube: Kube, namespace: str, name: str) -> dict[str, str]:
    proc = kube.kubectl("get", "secret", name, "-n", namespace, "-o", "json", check=False)
    if proc.returncode != 0:
        return {}
    return {k: base64.b64decode(v).decode() for k, v in (json.loads(proc.stdout).get("data") or {}).items()}


@pytest.mark.cluster
def test_deep_check_passes_then_names_a_flipped_byte(kube: Kube, s3: S3Info, learner: LearnerHandle,  # noqa: F811
                                                     operator_kubeconfig: Path, request: pytest.FixtureRequest) -> None:
    if request.config.getoption("--cluster") != "local":
        pytest.skip("verify pods run through the local pod runner")
    learner.request_merge("first")
    assert learner.wait_merge("first")["status"]["phase"] == "Succeeded"
    current = learner.status()["currentCheckpoint"]

    # The building blocks as the operator runs them: its own ServiceAccount, its own store identity.
    settings = Settings(s3_endpoint=s3.endpoint, s3_bucket=s3.bucket, s3_access_key=s3.operator.access_key,
                        s3_secret_key=s3.operator.secret_key, merge_image="privatefm/merge:test")
    checks = VerifyChecks(Clients(OperatorKube(kube_config.new_client_from_config(str(operator_kubeconfig))),
                                  Storage(settings), settings))
    lns = LearnerNamespace.model_validate(json.loads(kube.kubectl("get", "lns", learner.name, "-o", "json").stdout))
    who = learner_of(lns)
    ns, uri = learner.namespace, current["uri"]

    def finished(name: str) -> VerifyOutcome:
        return wait_for(lambda: checks.outcome(ns, name, current["manifestSha256"]), 90, f"verify Job {name}")

    checks.start(who, 1, uri, "verify-v1-1")
    checks.start(who, 1, uri, "verify-v1-1")  # idempotent
    good = finished("verify-v1-1")
    assert good == VerifyOutcome(True, None, None, good.message, current["manifestSha256"]), good
    job = json.loads(kube.kubectl("get", "job", "verify-v1-1", "-n", ns, "-o", "json").stdout)
    assert job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"] == {"cpu": "1", "memory": "512Mi"}
    # The operator ignores verify Jobs: no AdapterMerge, no Warning about a foreign Job.
    assert [a["metadata"]["name"] for a in json.loads(kube.kubectl("get", "am", "-n", ns, "-o", "json")
                                                      .stdout)["items"]] == ["first"]
    assert not [e for e in learner.events("ForeignJob") if e["involvedObject"]["name"].startswith("verify")]

    # The Secret the verify pod received is owned by its Job and can read its checkpoint, nothing more.
    secret = json.loads(kube.kubectl("get", "secret", naming.verify_secret("verify-v1-1"), "-n", ns, "-o", "json")
                        .stdout)
    assert secret["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
    env = _secret_env(kube, ns, naming.verify_secret("verify-v1-1"))
    reader = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_REGION"],
                          aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                          aws_session_token=env["AWS_SESSION_TOKEN"])
    prefix = layout.checkpoint_prefix(learner.ns_uid, 1)
    manifest = reader.get_object(Bucket=s3.bucket, Key=f"{prefix}/manifest.json")["Body"].read()
    for denied in (lambda: reader.put_object(Bucket=s3.bucket, Key=f"{prefix}/manifest.json", Body=manifest),
                   lambda: reader.delete_object(Bucket=s3.bucket, Key=f"{prefix}/manifest.json"),
                   lambda: reader.list_objects_v2(Bucket=s3.bucket, Prefix=f"{layout.learner_prefix(learner.ns_uid)}/"),
                   lambda: reader.get_object(Bucket=s3.bucket, Key=f"{layout.adapter_prefix(learner.ns_uid, 1)}/"
                                                                   "adapter_config.json")):
        with pytest.raises(ClientError, match="AccessDenied"):
            denied()

    # One byte of a shard flips in the store (same size, so only a rehash can tell).
    admin = s3.client()
    shard = max((o for o in admin.list_objects_v2(Bucket=s3.bucket, Prefix=f"{prefix}/")["Contents"]
                 if o["Key"].endswith(".safetensors")), key=lambda o: o["Size"])
    data = bytearray(admin.get_object(Bucket=s3.bucket, Key=shard["Key"])["Body"].read())
    data[len(data) // 2] ^= 0x01
    admin.put_object(Bucket=s3.bucket, Key=shard["Key"], Body=bytes(data))
    checks.start(who, 1, uri, "verify-v1-2")
    bad = finished("verify-v1-2")
    name = shard["Key"].removeprefix(f"{prefix}/")
    assert (bad.passed, bad.reason, bad.file, bad.corrupt) == (False, "ChecksumMismatch", name, True), bad
    assert name in bad.message

    # A Job of that name that is not a deep check (here: the merge's) is neither started, read nor deleted.
    with pytest.raises(VerifyConflict):
        checks.start(who, 1, uri, "first")
    assert checks.outcome(ns, "first") is not None and checks.delete(ns, "first") is False
    with pytest.raises(ValueError):
        checks.start(who, 1, layout.s3_uri(s3.bucket, layout.checkpoint_prefix(learner.ns_uid, 2)), "verify-v1-3")

    # Deleted with its pod and Secret.
    assert checks.delete(ns, "verify-v1-1") is True
    wait_for(lambda: not _secret_env(kube, ns, naming.verify_secret("verify-v1-1"))
             and json.loads(kube.kubectl("get", "pods", "-n", ns, "-l", "job-name=verify-v1-1", "-o", "json")
                            .stdout)["items"] == [], 60, "the verify Job's pod and Secret to go")
    assert checks.outcome(ns, "verify-v1-1") == VerifyOutcome(False, JOB_LOST, None,
                                                              "verify Job verify-v1-1 no longer exists")
