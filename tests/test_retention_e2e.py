"""Checkpoint retention end to end, on the real control plane and S3 server.

The session's operator is restarted for this module with the cleanup schedule every minute
(``PRIVATEFM_CLEANUP_CRON="* * * * *"``) and a zero age threshold for unfinished uploads (MinIO
cannot backdate an upload's initiation time, so "older than a day" is a setting, 0 here), and put
back afterwards. The first pruning comes from the schedule; the later runs are asked for with the
``prune-requested`` annotation, as a user would to prune at once. Merge pods are real merges
through the local pod runner.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from privatefm_merge import layout
from privatefm_testing import seed
from privatefm_testing.cluster import S3Info
from privatefm_testing.kube import Kube, wait_for
from privatefm_testing.operator_proc import OperatorProcess
from privatefm_testing.podrunner import Hooks
from test_operator import LearnerHandle, get

pytestmark = pytest.mark.cluster
REPO = Path(__file__).resolve().parents[1]
MANIFEST_MAX = 16 * 1024  # a manifest of the test model is about 2 KiB
PRUNED = re.compile(r"pruned (\d+) checkpoint versions \(([^)]*)\): (\d+) objects, (\d+) bytes; aborted (\d+)")


@pytest.fixture(scope="module", autouse=True)
def local_pods_only(request: pytest.FixtureRequest) -> None:
    if request.config.getoption("--cluster") != "local":
        pytest.skip("merge pods run through the local pod runner")


@pytest.fixture(scope="module")
def pruning_operator(operator: OperatorProcess) -> Iterator[OperatorProcess]:
    """The session's one operator, restarted with retention every minute."""
    with operator.restarted(PRIVATEFM_CLEANUP_CRON="* * * * *", PRIVATEFM_STALE_UPLOAD_SECONDS="0") as pruning:
        yield pruning


@pytest.fixture
def learner(kube: Kube, s3: S3Info, pruning_operator: OperatorProcess, uid: str) -> Iterator[LearnerHandle]:
    name = f"learner-{uid}"
    body = yaml.safe_load((REPO / "manifests" / "samples" / "learnernamespace-minimal.yaml").read_text())
    body["metadata"]["name"] = name
    body["spec"]["learnerId"] = f"l{uid}"
    body["spec"]["deletionDelay"] = "2s"
    body["spec"]["retention"] = {"keep": 3}
    kube.kubectl("apply", "-f", "-", input=json.dumps(body))
    kube.kubectl("wait", "--for=condition=Ready", f"lns/{name}", "--timeout=60s")
    status = get(kube, "lns", name)["status"]
    handle = LearnerHandle(kube, s3, name, f"l{uid}", status["namespace"], status["nsUid"])
    handle.publish_adapter(1)
    yield handle
    handle.delete()


def stored_versions(s3: S3Info, ns_uid: str) -> set[int]:
    listed = s3.client().list_objects_v2(Bucket=s3.bucket, Prefix=f"{layout.learner_prefix(ns_uid)}/checkpoints/")
    return {int(o["Key"].split("/")[3][1:]) for o in listed.get("Contents", [])}


def uploads_of(s3: S3Info, key: str) -> list[str]:
    return [u["UploadId"] for u in s3.client().list_multipart_uploads(Bucket=s3.bucket, Prefix=key).get("Uploads", [])]


def request_prune(learner: LearnerHandle, value: str) -> None:
    """A retention run now: a new value of the prune-requested annotation, until the status has handled it."""
    learner.kube.kubectl("annotate", "lns", learner.name, f"privatefm.io/prune-requested={value}", "--overwrite")
    wait_for(lambda: (learner.status().get("retention") or {}).get("request") == value, 60,
             f"the retention run asked for by {value!r}")


def pruned_events(learner: LearnerHandle) -> list[tuple[int, list[int], int, int, int]]:
    found = []
    for event in learner.events("CheckpointsPruned"):
        assert event["type"] == "Normal" and event["involvedObject"]["kind"] == "LearnerNamespace", event
        m = PRUNED.search(event["message"])
        assert m, event["message"]
        versions = [int(v[1:]) for v in m.group(2).split(", ") if v != "none"]
        found.append((int(m.group(1)), versions, int(m.group(3)), int(m.group(4)), int(m.group(5))))
    return found


def within_manifests(pruned: int, checkpoint_bytes: int, versions: int) -> bool:
    """Pruned bytes count every object; a checkpoint's sizeBytes counts its files but not its manifest."""
    return checkpoint_bytes < pruned < checkpoint_bytes + versions * MANIFEST_MAX


def test_retention_keeps_current_and_newest_verified_and_what_runs_use(
        learner: LearnerHandle, hooks: Hooks, pruning_operator: OperatorProcess, s3: S3Info) -> None:
    # Six verified versions.
    for n in range(1, 7):
        learner.request_merge(f"m{n}")
        assert learner.wait_merge(f"m{n}")["status"]["phase"] == "Succeeded"
    assert learner.checkpoint_version() == 6
    sizes = {v: learner.merge(f"m{v}")["status"]["checkpoint"]["sizeBytes"] for v in range(1, 7)}

    # keep 3: the current v6 and v5, v4, v3 stay; v1 and v2 go (a run every minute).
    wait_for(lambda: stored_versions(s3, learner.ns_uid) == {3, 4, 5, 6}, 90, "v1 and v2 to be pruned")
    events = pruned_events(learner)
    assert sorted(v for _, versions, *_ in events for v in versions) == [1, 2]
    assert within_manifests(sum(e[3] for e in events), sizes[1] + sizes[2], 2)
    assert all(count == len(versions) and size > 0 for count, versions, _, size, _ in events)

    # A killed merge's unfinished multipart upload, in a version directory that has nothing else.
    admin = s3.client()
    shard = next(o["Key"].rsplit("/", 1)[1] for o in admin.list_objects_v2(
        Bucket=s3.bucket, Prefix=layout.base_prefix(seed.BASE_MODEL, 1) + "/")["Contents"]
        if o["Key"].endswith(".safetensors"))
    stale = f"{layout.checkpoint_prefix(learner.ns_uid, 1)}/{shard}"
    upload = admin.create_multipart_upload(Bucket=s3.bucket, Key=stale)["UploadId"]
    assert uploads_of(s3, stale) == [upload]

    # A run that has written v7 and not finished yet (its pod is held before it reports).
    held, release = threading.Event(), threading.Event()

    def hold(pod: dict[str, Any], code: int) -> None:
        held.set()
        release.wait(180)

    hooks.by_namespace[learner.namespace] = hold
    try:
        learner.request_merge("m7")
        assert held.wait(120), "the merge pod never ran"
        assert 7 in stored_versions(s3, learner.ns_uid)
        # A run asked for now (the annotation), rather than at the next minute's fire.
        request_prune(learner, "while-m7-runs")
        assert learner.merge("m7")["status"]["phase"] == "Running"
        # The running merge's target and the current checkpoint survive; the stale upload is aborted.
        assert stored_versions(s3, learner.ns_uid) == {3, 4, 5, 6, 7}
        assert uploads_of(s3, stale) == []
        assert any(aborted >= 1 for *_, aborted in pruned_events(learner))
    finally:
        release.set()
        hooks.by_namespace.pop(learner.namespace, None)
    assert learner.wait_merge("m7")["status"]["phase"] == "Succeeded"
    assert learner.checkpoint_version() == 7

    # v7 is now current: v3 is the fourth-newest verified one besides it, and goes at the next run.
    request_prune(learner, "after-m7")
    assert stored_versions(s3, learner.ns_uid) == {4, 5, 6, 7}
    status = learner.status()
    assert status["retention"]["versionsPruned"] == 1
    assert within_manifests(status["retention"]["bytesPruned"], sizes[3], 1)
    metrics = pruning_operator.metrics()
    assert metrics["privatefm_checkpoints_pruned_total"] >= 3
    assert metrics["privatefm_checkpoint_bytes_pruned_total"] >= sizes[1] + sizes[2] + sizes[3]
    assert metrics["privatefm_incomplete_uploads_aborted_total"] >= 1
