"""The operator end to end on the real control plane and S3 server.

The operator runs as a subprocess under its own ServiceAccount token and the RBAC shipped in
manifests/rbac.yaml; merge pods run as local processes through the pod runner, with the merge
image's real CLI, so each successful merge here is a real LoRA merge into a real checkpoint.
"""

from __future__ import annotations

import base64
import copy
import itertools
import json
import os
import signal
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from botocore.exceptions import ClientError
from privatefm_merge import layout
from privatefm_merge.store import S3Store
from privatefm_testing import seed
from privatefm_testing.cluster import Credentials, S3Info
from privatefm_testing.kube import Kube, wait_for
from privatefm_testing.nodehooks import NodeHookRunner
from privatefm_testing.operator_proc import OperatorProcess
from privatefm_testing.podrunner import Hooks, PodRunner

pytestmark = pytest.mark.cluster
REPO = Path(__file__).resolve().parents[1]
GUARDIAN = "parent-of-bo"  # the guardian of manifests/samples/learnernamespace-minimal.yaml
APPROVAL = "privatefm.io/deletion-approved-by"
GUARDIAN_GROUP, GROUP_MEMBER = "school-admins", "teacher-1"


def get(kube: Kube, *args: str) -> dict[str, Any]:
    proc = kube.kubectl("get", *args, "-o", "json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else {}


# ---- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def local_pods_only(request: pytest.FixtureRequest) -> None:
    if request.config.getoption("--cluster") != "local":
        pytest.skip("the operator end-to-end tests run merge pods through the local pod runner; on kind they "
                    "would need the merge image built and loaded into the cluster, which is not wired up yet")


@dataclass
class LearnerHandle:
    kube: Kube
    s3: S3Info
    name: str
    learner_id: str
    namespace: str
    ns_uid: str

    def status(self) -> dict[str, Any]:
        return dict(get(self.kube, "lns", self.name).get("status") or {})

    def checkpoint_version(self) -> int | None:
        return (self.status().get("currentCheckpoint") or {}).get("version")

    def request_merge(self, name: str, **spec: Any) -> None:
        body = {"apiVersion": "privatefm.io/v1alpha1", "kind": "AdapterMerge",
                "metadata": {"name": name, "namespace": self.namespace}, "spec": {"trigger": "Manual", **spec}}
        self.kube.kubectl("create", "-f", "-", input=json.dumps(body))

    def merge(self, name: str) -> dict[str, Any]:
        return get(self.kube, "am", name, "-n", self.namespace)

    def wait_merge(self, name: str, timeout: float = 120) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            am = self.merge(name)
            return am if (am.get("status") or {}).get("phase") in ("Succeeded", "Failed") else None
        return dict(wait_for(done, timeout, f"AdapterMerge {name} to finish"))

    def publish_adapter(self, seq: int, corrupt: bool = False, mode: str | None = None) -> None:
        seed.publish_adapter(self.s3.client(), self.s3.bucket, self.ns_uid, seq, seed=seq, corrupt=corrupt,
                             mode=mode)

    def manifest(self, version: int) -> dict[str, Any]:
        key = f"{layout.checkpoint_prefix(self.ns_uid, version)}/{layout.MANIFEST_NAME}"
        return dict(json.loads(self.s3.client().get_object(Bucket=self.s3.bucket, Key=key)["Body"].read()))

    def wait_status(self, predicate: Callable[[dict[str, Any]], Any], what: str, timeout: float = 120) -> Any:
        return wait_for(lambda: predicate(self.status()), timeout, what)

    def approve_deletion(self, guardian: str = GUARDIAN) -> None:
        self.kube.kubectl("annotate", "--overwrite", "lns", self.name, f"{APPROVAL}={guardian}",
                          as_user=guardian, as_groups=("system:authenticated",))

    def delete(self) -> None:
        """Delete as the product intends: request it, and a listed guardian approves (no waiting)."""
        if get(self.kube, "lns", self.name):
            self.kube.kubectl("delete", "lns", self.name, "--wait=false", check=False)
            self.approve_deletion()

    def events(self, reason: str) -> list[dict[str, Any]]:
        items = get(self.kube, "events", "-A", "--field-selector", f"reason={reason}").get("items", [])
        return [e for e in items if e["involvedObject"]["name"] == self.name
                or e["involvedObject"].get("namespace") == self.namespace]


@pytest.fixture
def learner(kube: Kube, s3: S3Info, operator: OperatorProcess, uid: str) -> Iterator[LearnerHandle]:
    name = f"learner-{uid}"
    body = yaml.safe_load((REPO / "manifests" / "samples" / "learnernamespace-minimal.yaml").read_text())
    body["metadata"]["name"] = name
    body["spec"]["learnerId"] = f"l{uid}"
    body["spec"]["deletionDelay"] = "2s"
    kube.kubectl("apply", "-f", "-", input=json.dumps(body))
    kube.kubectl("wait", "--for=condition=Ready", f"lns/{name}", "--timeout=60s")
    status = get(kube, "lns", name)["status"]
    handle = LearnerHandle(kube, s3, name, f"l{uid}", status["namespace"], status["nsUid"])
    handle.publish_adapter(1)
    yield handle
    handle.delete()


# ---- 1. provisioning -------------------------------------------------------------------------
def test_learner_namespace_is_provisioned_isolated_and_ready(kube: Kube, learner: LearnerHandle,
                                                             s3: S3Info) -> None:
    ns = get(kube, "namespace", learner.namespace)
    labels = ns["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    assert labels["privatefm.io/learner"] == learner.name and labels["privatefm.io/ns-uid"] == learner.ns_uid
    assert "ownerReferences" not in ns["metadata"], "a CRD reinstall must never cascade-delete learners"

    netpol = get(kube, "networkpolicy", "privatefm-isolation", "-n", learner.namespace)["spec"]
    assert netpol["podSelector"] == {} and sorted(netpol["policyTypes"]) == ["Egress", "Ingress"]
    assert netpol.get("ingress", []) == []
    ports = {(p["protocol"], p["port"]) for rule in netpol["egress"] for p in rule["ports"]}
    s3_host, s3_port = s3.endpoint.removeprefix("http://").rsplit(":", 1)
    assert ports == {("UDP", 53), ("TCP", 53), ("TCP", int(s3_port))}
    assert {"ipBlock": {"cidr": f"{s3_host}/32"}} in [t for rule in netpol["egress"] for t in rule.get("to", [])]

    quota = get(kube, "resourcequota", "privatefm-quota", "-n", learner.namespace)["spec"]["hard"]
    assert quota["requests.nvidia.com/gpu"] == "0" and quota["pods"] == "4"
    assert get(kube, "limitrange", "privatefm-limits", "-n", learner.namespace)
    sa = get(kube, "serviceaccount", "privatefm-merge", "-n", learner.namespace)
    assert sa["automountServiceAccountToken"] is False
    # No store credentials live in a learner namespace: each run gets its own, owned by its Job.
    assert get(kube, "secrets", "-n", learner.namespace)["items"] == []

    cron = get(kube, "cronjob", "nightly-merge", "-n", learner.namespace)["spec"]
    # No schedule in the spec: the learner's own point of the default window, 02:00-05:00.
    minute, hour, *rest = cron["schedule"].split()
    assert rest == ["*", "*", "*"] and 120 <= int(hour) * 60 + int(minute) < 300, cron["schedule"]
    assert cron["schedule"] == learner.status()["mergeSchedule"]
    assert cron["concurrencyPolicy"] == "Forbid"
    job = cron["jobTemplate"]["spec"]
    assert job["suspend"] is True and job["backoffLimit"] == 0
    pod = job["template"]["spec"]
    container = pod["containers"][0]
    assert pod["automountServiceAccountToken"] is False and pod["serviceAccountName"] == "privatefm-merge"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert container["terminationMessagePath"] == "/dev/termination-log"
    assert container["command"] == ["privatefm-merge", "pod"]
    assert container["envFrom"] == [{"secretRef": {"name": "privatefm-run-scheduled"}}]

    ready = next(c for c in learner.status()["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True" and ready["observedGeneration"] == 1
    assert learner.status()["phase"] == "Ready"
    assert learner.events("NamespaceCreated")


# ---- 2. drift --------------------------------------------------------------------------------
def test_drift_is_repaired(kube: Kube, learner: LearnerHandle, operator: OperatorProcess) -> None:
    """From the watch event, not a timer: each repair counts in privatefm_drift_repairs_total."""
    ns = learner.namespace
    repairs = operator.metrics().get("privatefm_drift_repairs_total", 0.0)
    uid_before = get(kube, "networkpolicy", "privatefm-isolation", "-n", ns)["metadata"]["uid"]
    kube.kubectl("delete", "networkpolicy", "privatefm-isolation", "-n", ns)
    restored = wait_for(lambda: get(kube, "networkpolicy", "privatefm-isolation", "-n", ns), 20,
                        "the NetworkPolicy to come back")
    assert restored["metadata"]["uid"] != uid_before

    kube.kubectl("patch", "resourcequota", "privatefm-quota", "-n", ns, "--type=merge",
                 "-p", json.dumps({"spec": {"hard": {"pods": "100"}}}))
    wait_for(lambda: get(kube, "resourcequota", "privatefm-quota", "-n", ns)["spec"]["hard"]["pods"] == "4",
             20, "the quota to be restored")
    assert operator.metrics().get("privatefm_drift_repairs_total", 0.0) >= repairs + 2


def test_an_idle_learner_costs_no_applies(kube: Kube, learner: LearnerHandle, operator: OperatorProcess) -> None:
    """The timer's passes (every 2 s in the tests) find nothing changed and send no apply; only the
    full resync (reason="full") applies without a reason."""
    def applies() -> dict[str, float]:
        return {k: v for k, v in operator.metrics().items()
                if k.startswith("privatefm_child_applies_total") and 'reason="full"' not in k}

    time.sleep(3)  # the learner fixture's own passes settle
    before = applies()
    time.sleep(7)  # three or more passes of every learner
    assert applies() == before
    # Every request of the operator's own client is counted, by verb, resource and status: the
    # learner's namespace was applied (and answered), and nothing is left unlabelled.
    requests = {k: v for k, v in operator.metrics().items() if k.startswith("privatefm_api_requests_total{")}
    assert sum(v for k, v in requests.items()
               if {'verb="apply"', 'resource="Namespace"', 'code="2xx"'} <= set(k[k.index("{") + 1:-1].split(","))) >= 1
    assert all('verb="' in k and 'resource="' in k and 'code="' in k for k in requests), requests
    assert get(kube, "networkpolicy", "privatefm-isolation", "-n", learner.namespace)["metadata"]["annotations"][
        "privatefm.io/desired-hash"]


# ---- 3. manual merges ------------------------------------------------------------------------
def test_manual_merges_produce_verified_increasing_checkpoints(kube: Kube, learner: LearnerHandle,
                                                               s3: S3Info) -> None:
    from privatefm_merge.verify import verify_checkpoint

    learner.request_merge("first")
    am = learner.wait_merge("first")
    assert am["status"]["phase"] == "Succeeded", am["status"]
    assert am["status"]["targetVersion"] == 1 and am["status"]["reason"] == "Verified"
    jobs = get(kube, "jobs", "-n", learner.namespace)["items"]
    assert [j["metadata"]["name"] for j in jobs] == ["first"]
    assert jobs[0]["metadata"]["ownerReferences"][0]["kind"] == "AdapterMerge"

    uri = layout.s3_uri(s3.bucket, layout.checkpoint_prefix(learner.ns_uid, 1))
    report = verify_checkpoint(uri, s3_client=s3.client())
    assert report.ok and report.manifest is not None and report.manifest.version == 1
    current = learner.status()["currentCheckpoint"]
    assert current["version"] == 1 and current["uri"] == uri
    assert current["manifestSha256"] == report.manifest_sha256 and current["baseVersion"] == 1
    assert learner.events("MergeCompleted")

    learner.publish_adapter(2)
    learner.request_merge("second")
    am = learner.wait_merge("second")
    assert am["status"]["phase"] == "Succeeded" and am["status"]["targetVersion"] == 2
    assert am["status"]["parentVersion"] == 1 and am["status"]["adapterSeq"] == 2
    assert learner.checkpoint_version() == 2
    row = kube.kubectl("get", "lns", learner.name, "--no-headers").stdout.split()
    assert row[1:5] == [learner.learner_id, "Ready", "2", "0"]


def test_concurrent_merges_never_share_a_version(learner: LearnerHandle) -> None:
    names = [f"burst-{i}" for i in range(4)]
    threads = [threading.Thread(target=learner.request_merge, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results = [learner.wait_merge(n, timeout=240)["status"] for n in names]
    versions = [r["targetVersion"] for r in results]
    assert sorted(versions) == [1, 2, 3, 4], versions
    assert all(r["phase"] == "Succeeded" for r in results), results
    assert learner.checkpoint_version() == 4


# ---- 4. scheduled merges ---------------------------------------------------------------------
def test_cronjob_fires_and_records_a_scheduled_merge(kube: Kube, learner: LearnerHandle) -> None:
    kube.kubectl("patch", "lns", learner.name, "--type=merge", "-p",
                 json.dumps({"spec": {"merge": {"schedule": "* * * * *"}}}))
    wait_for(lambda: get(kube, "cronjob", "nightly-merge", "-n", learner.namespace)["spec"]["schedule"]
             == "* * * * *", 20, "the CronJob to take the new schedule")

    def scheduled() -> list[dict[str, Any]]:
        items = get(kube, "am", "-n", learner.namespace).get("items", [])
        return [a for a in items if a["spec"]["trigger"] == "Scheduled"
                and (a.get("status") or {}).get("phase") == "Succeeded"]

    runs = wait_for(scheduled, 150, "a scheduled AdapterMerge to succeed", interval=2)
    job = get(kube, "job", runs[0]["metadata"]["name"], "-n", learner.namespace)
    assert job["metadata"]["ownerReferences"][0]["kind"] == "CronJob"
    assert runs[0]["status"]["targetVersion"] >= 1
    assert (learner.checkpoint_version() or 0) >= runs[0]["status"]["targetVersion"]
    kube.kubectl("patch", "lns", learner.name, "--type=merge", "-p",
                 json.dumps({"spec": {"merge": {"suspend": True}}}))


# ---- 5. failed merges ------------------------------------------------------------------------
def test_bad_adapter_fails_with_reason_and_event(learner: LearnerHandle) -> None:
    learner.request_merge("good")
    assert learner.wait_merge("good")["status"]["phase"] == "Succeeded"
    learner.publish_adapter(2, corrupt=True)
    learner.request_merge("bad")
    status = learner.wait_merge("bad")["status"]
    assert status["phase"] == "Failed"
    assert status["reason"] == "ShapeMismatch", status
    assert status["message"]
    stalled = next(c for c in status["conditions"] if c["type"] == "Stalled")
    assert stalled["status"] == "True" and stalled["reason"] == "ShapeMismatch"
    assert any("bad" in e["message"] or e["involvedObject"]["name"] == "bad" for e in learner.events("MergeFailed"))
    assert learner.checkpoint_version() == 1
    assert learner.status()["lastAssignedVersion"] == 2  # the failed run's version is never reused


def test_merge_without_adapter_fails_clearly(kube: Kube, operator: OperatorProcess, s3: S3Info, uid: str) -> None:
    body = yaml.safe_load((REPO / "manifests" / "samples" / "learnernamespace-minimal.yaml").read_text())
    body["metadata"]["name"] = f"noadapter-{uid}"
    body["spec"]["learnerId"] = f"n{uid}"
    kube.kubectl("apply", "-f", "-", input=json.dumps(body))
    try:
        kube.kubectl("wait", "--for=condition=Ready", f"lns/noadapter-{uid}", "--timeout=60s")
        status = get(kube, "lns", f"noadapter-{uid}")["status"]
        handle = LearnerHandle(kube, s3, f"noadapter-{uid}", f"n{uid}", status["namespace"], status["nsUid"])
        handle.request_merge("too-early")
        result = handle.wait_merge("too-early")["status"]
        assert result["phase"] == "Failed" and result["reason"] == "NoAdapter", result
        assert f"learners/{handle.ns_uid}/adapters/" in result["message"]
        assert get(kube, "jobs", "-n", handle.namespace)["items"] == []  # nothing was started
    finally:
        kube.kubectl("delete", "lns", f"noadapter-{uid}", "--wait=false", check=False)


def test_missing_base_model_stalls_the_learner_not_the_operator(kube: Kube, operator: OperatorProcess,
                                                                 learner: LearnerHandle, uid: str) -> None:
    body = yaml.safe_load((REPO / "manifests" / "samples" / "learnernamespace-minimal.yaml").read_text())
    body["metadata"]["name"] = f"nobase-{uid}"
    body["spec"]["learnerId"] = f"b{uid}"
    body["spec"]["baseModel"] = {"name": "no-such-model"}
    kube.kubectl("apply", "-f", "-", input=json.dumps(body))
    try:
        kube.kubectl("wait", "--for=condition=Stalled", f"lns/nobase-{uid}", "--timeout=60s")
        status = get(kube, "lns", f"nobase-{uid}")["status"]
        stalled = next(c for c in status["conditions"] if c["type"] == "Stalled")
        assert stalled["reason"] == "BaseModelNotFound" and "no-such-model" in stalled["message"]
        assert next(c for c in status["conditions"] if c["type"] == "Ready")["status"] == "False"
        # The operator keeps serving everyone else.
        learner.request_merge("still-works")
        assert learner.wait_merge("still-works")["status"]["phase"] == "Succeeded"
    finally:
        kube.kubectl("delete", "lns", f"nobase-{uid}", "--wait=false", check=False)


# ---- 6. tampered results ---------------------------------------------------------------------
def test_tampered_checkpoint_is_never_accepted(learner: LearnerHandle, hooks: Hooks, s3: S3Info) -> None:
    client = s3.client()

    def flip_a_byte(pod: dict[str, Any], code: int) -> None:
        prefix = layout.checkpoint_prefix(learner.ns_uid, 1)
        key = next(o["Key"] for o in client.list_objects_v2(Bucket=s3.bucket, Prefix=prefix)["Contents"]
                   if o["Key"].endswith(".safetensors"))
        data = bytearray(client.get_object(Bucket=s3.bucket, Key=key)["Body"].read())
        data[-1] ^= 0xFF
        client.put_object(Bucket=s3.bucket, Key=key, Body=bytes(data))
        # And a shard upload that never completed, as a pod killed mid-write leaves one.
        client.create_multipart_upload(Bucket=s3.bucket, Key=key)
        assert checkpoint.incomplete_uploads(names=shards)

    checkpoint = S3Store(client, s3.bucket, layout.checkpoint_prefix(learner.ns_uid, 1))
    shards = [o["Key"].rsplit("/", 1)[1] for o in client.list_objects_v2(
        Bucket=s3.bucket, Prefix=layout.base_prefix(seed.BASE_MODEL, 1) + "/")["Contents"]]

    hooks.by_namespace[learner.namespace] = flip_a_byte
    try:
        learner.request_merge("tampered")
        status = learner.wait_merge("tampered")["status"]
    finally:
        hooks.by_namespace.pop(learner.namespace)
    assert status["phase"] == "Failed" and status["reason"] == "VerificationFailed", status
    assert ".safetensors" in status["message"]
    assert learner.checkpoint_version() is None
    wait_for(lambda: not checkpoint.incomplete_uploads(names=shards), 20,
             "the operator to abort the failed run's unfinished upload")


# ---- 7. restart during a merge ---------------------------------------------------------------
def test_operator_killed_mid_merge_converges_without_duplicates(
        kube: Kube, learner: LearnerHandle, hooks: Hooks, operator: OperatorProcess,
        podrunner: PodRunner | NodeHookRunner) -> None:
    release = threading.Event()
    if isinstance(podrunner, PodRunner):
        # The quick lane holds the merge pod's report until the operator is back. On the node the pod
        # runs for seconds on its own (a hook there would freeze the operator before "Running").
        hooks.by_namespace[learner.namespace] = lambda pod, code: release.wait(60)
    try:
        learner.request_merge("during-crash")
        wait_for(lambda: (learner.merge("during-crash").get("status") or {}).get("phase") == "Running", 60,
                 "the merge to be running")
        operator.kill()
        learner.request_merge("while-down")  # nobody is watching now
        release.set()
        time.sleep(2)
        operator.start()
        first, second = learner.wait_merge("during-crash"), learner.wait_merge("while-down")
    finally:
        hooks.by_namespace.pop(learner.namespace, None)
        release.set()
    assert first["status"]["phase"] == second["status"]["phase"] == "Succeeded"
    assert {first["status"]["targetVersion"], second["status"]["targetVersion"]} == {1, 2}
    jobs = sorted(j["metadata"]["name"] for j in get(kube, "jobs", "-n", learner.namespace)["items"])
    assert jobs == ["during-crash", "while-down"]
    ams = sorted(a["metadata"]["name"] for a in get(kube, "am", "-n", learner.namespace)["items"])
    assert ams == ["during-crash", "while-down"]
    assert learner.checkpoint_version() == 2


# ---- 8. metrics ------------------------------------------------------------------------------
def test_metrics_count_what_happened(kube: Kube, learner: LearnerHandle, operator: OperatorProcess) -> None:
    ok_key = 'privatefm_merge_operations_total{result="succeeded",trigger="Manual"}'
    bad_key = 'privatefm_merge_operations_total{result="failed",trigger="Manual"}'
    before = operator.metrics()
    learner.request_merge("counted-ok")
    assert learner.wait_merge("counted-ok")["status"]["phase"] == "Succeeded"
    learner.publish_adapter(2, corrupt=True)
    learner.request_merge("counted-bad")
    assert learner.wait_merge("counted-bad")["status"]["phase"] == "Failed"
    after = operator.metrics()
    assert after[ok_key] - before.get(ok_key, 0) == 1
    assert after[bad_key] - before.get(bad_key, 0) == 1
    assert after["privatefm_merge_duration_seconds_count"] - before.get("privatefm_merge_duration_seconds_count", 0) \
        == 2
    assert after["privatefm_checkpoint_size_bytes_count"] - before.get("privatefm_checkpoint_size_bytes_count", 0) == 1
    size = learner.status()["currentCheckpoint"]["sizeBytes"]
    assert after["privatefm_checkpoint_size_bytes_sum"] - before.get("privatefm_checkpoint_size_bytes_sum", 0) == size
    # Accepted by the store's SHA-256 checksums (one HEAD per file): the operator read no model bytes.
    assert after.get("privatefm_accept_bytes_read_total", 0) == before.get("privatefm_accept_bytes_read_total", 0)
    live = len(get(kube, "lns")["items"])
    assert after["privatefm_learner_namespaces"] == live
    assert any(k.startswith("privatefm_reconcile_duration_seconds_count") for k in after)
    # The per-learner gauges follow the learner's status (written after the run's checkpoint moved).
    status = learner.status()
    series = f'{{learner="{learner.name}"}}'

    def gauges() -> dict[str, float] | None:
        now = operator.metrics()
        return now if now.get("privatefm_learner_checkpoint_version" + series) == \
            status["currentCheckpoint"]["version"] else None
    now = wait_for(gauges, 30, "the checkpoint version gauge")
    verified = datetime.fromisoformat(status["currentCheckpoint"]["verifiedAt"].replace("Z", "+00:00"))
    assert now["privatefm_learner_last_merge_success_timestamp_seconds" + series] == pytest.approx(
        verified.timestamp(), abs=1)
    assert now["privatefm_learner_version_lag" + series] == status["versionLag"] == 0


def test_probes_and_structured_logs(operator: OperatorProcess, learner: LearnerHandle) -> None:
    for path in ("/healthz", "/readyz"):
        assert urllib.request.urlopen(operator.url + path, timeout=5).status == 200
    # /healthz is kopf's liveness answer: the results of its probe handlers, from its own event loop.
    assert json.loads(urllib.request.urlopen(operator.url + "/healthz", timeout=5).read()) == {"reconcilers": True}
    lines = operator.log_path.read_text().splitlines()
    assert lines, "the operator logged nothing"
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert {"ts", "level", "logger", "msg"} <= set(records[-1])
    created = [r for r in records if r["msg"] == "namespace created" and r.get("learner") == learner.name]
    assert created and created[0]["namespace"] == learner.namespace


# ---- 9. least privilege ----------------------------------------------------------------------
def test_merge_service_account_has_no_api_rights(kube: Kube, learner: LearnerHandle) -> None:
    sa = f"system:serviceaccount:{learner.namespace}:privatefm-merge"
    groups = ("system:serviceaccounts", f"system:serviceaccounts:{learner.namespace}", "system:authenticated")
    for verb in ("get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"):
        for resource in ("pods", "secrets", "configmaps", "jobs.batch", "serviceaccounts",
                         "learnernamespaces.privatefm.io", "adaptermerges.privatefm.io", "namespaces"):
            answer = kube.kubectl("auth", "can-i", verb, resource, "-n", learner.namespace, as_user=sa,
                                  as_groups=groups, check=False).stdout.strip()
            assert answer == "no", f"merge pods may {verb} {resource}"


# ---- 10. store isolation, with the credentials a merge pod really receives -------------------
def _allowed(call: Callable[[], object]) -> bool:
    try:
        call()
    except ClientError as err:
        code = err.response.get("Error", {}).get("Code")
        assert code in ("AccessDenied", "AllAccessDisabled"), f"refused for another reason: {err}"
        return False
    return True


def test_a_merge_pod_gets_run_scoped_short_lived_credentials(kube: Kube, learner: LearnerHandle, hooks: Hooks,
                                                            operator: OperatorProcess, s3: S3Info) -> None:
    """The Secret the operator hands one run: owned by the Job, temporary, and good for that run only.
    Every row of the store matrix is tried with exactly those credentials."""
    other = "0ther1earner"  # another learner's prefix, with data in it
    admin = s3.client()
    admin.put_object(Bucket=s3.bucket, Key=f"{layout.adapter_prefix(other, 1)}/adapter_config.json", Body=b"{}")
    held, release = threading.Event(), threading.Event()

    def hold(pod: dict[str, Any], code: int) -> None:
        held.set()
        release.wait(90)

    hooks.by_namespace[learner.namespace] = hold
    try:
        learner.request_merge("scoped")
        assert held.wait(90), "the merge pod never ran"
        secret = get(kube, "secret", "privatefm-run.scoped", "-n", learner.namespace)
        job = get(kube, "job", "scoped", "-n", learner.namespace)
        data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
        pod_creds = Credentials(endpoint=data["AWS_ENDPOINT_URL"], access_key=data["AWS_ACCESS_KEY_ID"],
                                secret_key=data["AWS_SECRET_ACCESS_KEY"], session_token=data["AWS_SESSION_TOKEN"])
        c = pod_creds.client()
        target = layout.checkpoint_prefix(learner.ns_uid, 1)
        base = layout.base_prefix(seed.BASE_MODEL, 1)
        rows = [
            ("read A's adapters", lambda: c.get_object(
                Bucket=s3.bucket, Key=f"{layout.adapter_prefix(learner.ns_uid, 1)}/adapter_config.json"), True),
            ("list A's adapters", lambda: c.list_objects_v2(
                Bucket=s3.bucket, Prefix=f"{layout.learner_prefix(learner.ns_uid)}/adapters/"), True),
            ("read the run's base version", lambda: c.get_object(Bucket=s3.bucket, Key=f"{base}/manifest.json"), True),
            ("write A's target version", lambda: c.put_object(Bucket=s3.bucket, Key=f"{target}/probe", Body=b"x"),
             True),
            ("write another version of A", lambda: c.put_object(
                Bucket=s3.bucket, Key=f"{layout.checkpoint_prefix(learner.ns_uid, 2)}/probe", Body=b"x"), False),
            ("read A's events", lambda: c.list_objects_v2(
                Bucket=s3.bucket, Prefix=f"{layout.events_prefix(learner.ns_uid)}/"), False),
            ("read learner B's adapter", lambda: c.get_object(
                Bucket=s3.bucket, Key=f"{layout.adapter_prefix(other, 1)}/adapter_config.json"), False),
            ("list learner B's prefix", lambda: c.list_objects_v2(
                Bucket=s3.bucket, Prefix=f"{layout.learner_prefix(other)}/"), False),
            ("write learner B's prefix", lambda: c.put_object(
                Bucket=s3.bucket, Key=f"{layout.adapter_prefix(other, 2)}/adapter_config.json", Body=b"{}"), False),
            ("write under base/", lambda: c.put_object(Bucket=s3.bucket, Key=f"{base}/evil", Body=b"x"), False),
            ("delete under base/", lambda: c.delete_object(Bucket=s3.bucket, Key=f"{base}/manifest.json"), False),
            ("list the whole bucket", lambda: c.list_objects_v2(Bucket=s3.bucket), False),
            ("create a bucket", lambda: c.create_bucket(Bucket="privatefm-evil"), False),
            ("delete a bucket", lambda: c.delete_bucket(Bucket=s3.bucket), False),
        ]
        outcomes = {what: _allowed(call) for what, call, _ in rows}
        c.delete_object(Bucket=s3.bucket, Key=f"{target}/probe")  # leave the checkpoint as the pod wrote it
        assert outcomes == {what: expected for what, _, expected in rows}

        # The Secret belongs to the Job (garbage-collected with it); the keys are temporary and not the
        # operator's; the pod spec names the Secret and carries no key.
        owner = secret["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["name"], owner["uid"]) == ("Job", "scoped", job["metadata"]["uid"])
        assert pod_creds.access_key not in (s3.operator.access_key, s3.publisher.access_key, s3.root.access_key)
        assert job["spec"]["template"]["spec"]["containers"][0]["envFrom"] == [
            {"secretRef": {"name": "privatefm-run.scoped"}}]
        leaked_into = json.dumps(job) + json.dumps(get(kube, "pods", "-n", learner.namespace))
        assert pod_creds.secret_key not in leaked_into and pod_creds.session_token not in leaked_into

        # No Secret in any learner namespace holds a long-lived key of the store.
        long_lived = {s3.operator.access_key, s3.operator.secret_key, s3.publisher.access_key,
                      s3.publisher.secret_key, s3.root.access_key, s3.root.secret_key}
        learner_namespaces = [n["metadata"]["name"] for n in get(
            kube, "namespaces", "-l", "app.kubernetes.io/managed-by=privatefm-operator")["items"]]
        for ns in learner_namespaces:
            for item in get(kube, "secrets", "-n", ns)["items"]:
                values = {base64.b64decode(v).decode() for v in (item.get("data") or {}).values()}
                assert not values & long_lived, f"{ns}/{item['metadata']['name']} holds a long-lived store key"
    finally:
        release.set()
        hooks.by_namespace.pop(learner.namespace, None)
    status = learner.wait_merge("scoped")["status"]
    assert status["phase"] == "Succeeded", status
    events = json.dumps(get(kube, "events", "-n", learner.namespace))
    record = json.dumps(status) + events + operator.log_path.read_text()
    assert pod_creds.secret_key not in record and pod_creds.session_token not in record
    assert pod_creds.access_key not in record


# ---- 11. every accepted spec ends in a visible status ----------------------------------------
def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions", []) if c["type"] == type_), {})


def test_a_spec_the_api_server_refuses_is_stalled_with_its_message_and_not_retried(
        kube: Kube, learner: LearnerHandle) -> None:
    kube.kubectl("patch", "lns", learner.name, "--type=merge", "-p",
                 json.dumps({"spec": {"merge": {"timeZone": "Mars/Olympus"}}}))
    stalled = wait_for(lambda: (c := condition(learner.status(), "Stalled")).get("reason") == "InvalidSpec" and c,
                       20, "the learner to be Stalled/InvalidSpec")
    assert stalled["status"] == "True" and "Mars/Olympus" in stalled["message"] and "CronJob" in stalled["message"]
    status = learner.status()
    assert status["phase"] == "Failed" and condition(status, "Ready")["status"] == "False"
    assert status["observedGeneration"] == get(kube, "lns", learner.name)["metadata"]["generation"]
    warnings = learner.events("InvalidSpec")
    assert warnings and warnings[0]["type"] == "Warning" and "Mars/Olympus" in warnings[0]["message"]
    time.sleep(6)  # three resyncs: a refused spec is not tried again until it changes
    assert len(learner.events("InvalidSpec")) == len(warnings)
    assert condition(learner.status(), "Stalled") == stalled

    kube.kubectl("patch", "lns", learner.name, "--type=merge", "-p",
                 json.dumps({"spec": {"merge": {"timeZone": "Europe/Berlin"}}}))
    wait_for(lambda: condition(learner.status(), "Ready").get("status") == "True", 20, "the learner to recover")
    assert get(kube, "cronjob", "nightly-merge", "-n", learner.namespace)["spec"]["timeZone"] == "Europe/Berlin"


def test_a_store_outage_shows_in_status_and_heals(kube: Kube, learner: LearnerHandle) -> None:
    assert kube.local is not None and kube.local.state is not None
    minio = kube.local.state.pids["minio"]
    assert condition(learner.status(), "StoreAvailable")["status"] == "True"
    os.kill(minio, signal.SIGSTOP)  # the store stops answering (connections hang)
    try:
        started = time.monotonic()
        wait_for(lambda: condition(learner.status(), "StoreAvailable").get("status") == "False", 40,
                 "StoreAvailable=False")
        flagged = time.monotonic() - started
        status = learner.status()
        assert condition(status, "Ready")["status"] == "True", "Ready must survive an outage shorter than the grace"
        assert condition(status, "StoreAvailable")["reason"] == "StoreUnreachable"
        ready = wait_for(lambda: (c := condition(learner.status(), "Ready")).get("status") == "False" and c, 40,
                         "Ready=False once the grace has passed")
        assert ready["reason"] == "StoreUnreachable" and condition(learner.status(), "Stalled")["status"] == "False"
        print(f"StoreAvailable=False after {flagged:.1f}s, Ready=False after {time.monotonic() - started:.1f}s")
    finally:
        os.kill(minio, signal.SIGCONT)
    wait_for(lambda: condition(learner.status(), "Ready").get("status") == "True"
             and condition(learner.status(), "StoreAvailable").get("status") == "True", 40, "recovery")
    learner.request_merge("after-outage")
    assert learner.wait_merge("after-outage")["status"]["phase"] == "Succeeded"


# ---- 12. identity that others cannot forge ---------------------------------------------------
def untrusted(operator: OperatorProcess, kind: str, reason: str) -> float:
    return operator.metrics().get(f'privatefm_untrusted_objects_total{{kind="{kind}",reason="{reason}"}}', 0.0)


def warning_about(kube: Kube, namespace: str, name: str, reason: str) -> list[dict[str, Any]]:
    items = get(kube, "events", "-n", namespace, "--field-selector", f"reason={reason}").get("items", [])
    return [e for e in items if e["involvedObject"]["name"] == name and e["type"] == "Warning"]


def test_a_namespace_labelled_for_another_learner_gets_nothing(kube: Kube, learner: LearnerHandle,
                                                               operator: OperatorProcess, uid: str) -> None:
    """A namespace an admin labelled as the victim's, with an AdapterMerge in it: ignored."""
    forged = f"forged-{uid}"
    before = untrusted(operator, "AdapterMerge", "NotALearnerNamespace")
    victim_counter = learner.status().get("lastAssignedVersion")
    kube.kubectl("create", "namespace", forged)
    try:
        kube.kubectl("label", "namespace", forged, f"privatefm.io/learner={learner.name}",
                     "app.kubernetes.io/managed-by=privatefm-operator", f"privatefm.io/ns-uid={learner.ns_uid}")
        body = {"apiVersion": "privatefm.io/v1alpha1", "kind": "AdapterMerge",
                "metadata": {"name": "steal", "namespace": forged}, "spec": {"trigger": "Manual"}}
        kube.kubectl("create", "-f", "-", input=json.dumps(body))
        wait_for(lambda: warning_about(kube, forged, "steal", "NotALearnerNamespace"), 20, "a Warning about it")
        time.sleep(3)  # a few resyncs: still nothing happens
        assert not (get(kube, "am", "steal", "-n", forged).get("status") or {}).get("phase")
        assert get(kube, "jobs", "-n", forged)["items"] == []
        assert get(kube, "jobs", "-n", learner.namespace)["items"] == []
        assert learner.status().get("lastAssignedVersion") == victim_counter  # no version of the victim spent
        assert untrusted(operator, "AdapterMerge", "NotALearnerNamespace") > before
    finally:
        # Only the operator deletes a namespace labelled managed-by (policy namespace-deletion).
        kube.kubectl("label", "namespace", forged, "app.kubernetes.io/managed-by-", check=False)
        kube.kubectl("delete", "namespace", forged, "--wait=false", check=False)


def test_a_job_with_our_labels_elsewhere_is_never_started_or_fed(kube: Kube, learner: LearnerHandle,
                                                                 operator: OperatorProcess, namespace: str) -> None:
    """A suspended Job in an unrelated namespace, dressed as a scheduled run of the victim."""
    labels = {"app.kubernetes.io/managed-by": "privatefm-operator", "privatefm.io/trigger": "Scheduled",
              "privatefm.io/learner": learner.name, "privatefm.io/ns-uid": learner.ns_uid}
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "lure", "namespace": namespace,
                                                                  "labels": labels},
           "spec": {"suspend": True, "template": {"spec": {"restartPolicy": "Never", "containers": [
               {"name": "c", "image": "busybox", "command": ["true"]}]}}}}
    kube.kubectl("create", "-f", "-", input=json.dumps(job))
    wait_for(lambda: warning_about(kube, namespace, "lure", "ForeignJob"), 20, "a Warning about the Job")
    time.sleep(2)
    seen = get(kube, "job", "lure", "-n", namespace)
    assert seen["spec"]["suspend"] is True
    assert not (seen["spec"]["template"]["metadata"] or {}).get("annotations"), "no store URI is injected"
    assert get(kube, "am", "-n", namespace).get("items", []) == []
    assert untrusted(operator, "Job", "ForeignJob") >= 1


def test_status_forgery_is_refused_or_ignored(kube: Kube, learner: LearnerHandle) -> None:
    """status.nsUid pointed at another learner, and a fake currentCheckpoint: the admission policy
    refuses the write where it is installed; the operator ignores it where it is not."""
    other = "0123456789ab"
    forged = kube.kubectl("patch", "lns", learner.name, "--subresource=status", "--type=merge", "-p", json.dumps(
        {"status": {"nsUid": other, "currentCheckpoint": {
            "version": 99, "uri": "s3://evil/x", "manifestSha256": "0" * 64, "baseVersion": 1}}}), check=False)
    if forged.returncode == 0:
        wait_for(lambda: (c := condition(learner.status(), "CheckpointTrusted")).get("status") == "False" and c,
                 20, "the fake checkpoint to be flagged")
        wait_for(lambda: learner.events("NsUidMismatch"), 20, "a Warning about the foreign nsUid")
    else:
        assert "denied" in forged.stderr or "forbidden" in forged.stderr.lower(), forged.stderr
    learner.request_merge("after-forgery")
    status = learner.wait_merge("after-forgery")["status"]
    assert status["phase"] == "Succeeded", status
    assert status["checkpoint"]["uri"].startswith(f"s3://privatefm/learners/{learner.ns_uid}/checkpoints/")
    assert status.get("parentVersion") in (None, 0)  # the fake v99 was never taken as the parent
    current = learner.status()["currentCheckpoint"]
    assert current["uri"] == status["checkpoint"]["uri"]


# ---- 13. stable learners ---------------------------------------------------------------------
def test_a_second_learner_with_the_same_id_touches_nothing(kube: Kube, learner: LearnerHandle, uid: str) -> None:
    twin = f"twin-{uid}"
    body = yaml.safe_load((REPO / "manifests" / "samples" / "learnernamespace-minimal.yaml").read_text())
    body["metadata"]["name"] = twin
    body["spec"]["learnerId"] = learner.learner_id
    kube.kubectl("apply", "-f", "-", input=json.dumps(body))
    try:
        stalled = wait_for(lambda: (c := condition(get(kube, "lns", twin).get("status") or {}, "Stalled")).get(
            "reason") == "LearnerIdInUse" and c, 20, "the twin to be Stalled/LearnerIdInUse")
        assert learner.name in stalled["message"]
        labels = get(kube, "namespace", learner.namespace)["metadata"]["labels"]
        assert labels["privatefm.io/learner"] == learner.name
        assert condition(learner.status(), "Ready")["status"] == "True"
    finally:
        kube.kubectl("delete", "lns", twin, "--wait=false", check=False)


def test_a_namespace_the_operator_did_not_make_is_never_taken(kube: Kube, operator: OperatorProcess, uid: str) -> None:
    """An admin's namespace that happens to have the name a learnerId maps to: the learner stalls
    with NamespaceConflict, and the namespace keeps its labels and gets no child."""
    from privatefm_operator import naming

    learner_id = f"taken{uid}"
    namespace = naming.namespace_name(learner_id, naming.ns_uid(learner_id))
    kube.kubectl("create", "namespace", namespace)
    labels_before = get(kube, "namespace", namespace)["metadata"].get("labels")
    name = f"taken-{uid}"
    body = yaml.safe_load((REPO / "manifests" / "samples" / "learnernamespace-minimal.yaml").read_text())
    body["metadata"]["name"] = name
    body["spec"]["learnerId"] = learner_id
    kube.kubectl("apply", "-f", "-", input=json.dumps(body))
    try:
        stalled = wait_for(lambda: (c := condition(get(kube, "lns", name).get("status") or {}, "Stalled")).get(
            "reason") == "NamespaceConflict" and c, 20, "the learner to be Stalled/NamespaceConflict")
        assert namespace in stalled["message"]
        time.sleep(2)  # more passes of the learner
        assert get(kube, "namespace", namespace)["metadata"].get("labels") == labels_before
        for kind in ("serviceaccounts", "networkpolicies", "resourcequotas", "limitranges", "cronjobs", "roles",
                     "rolebindings"):
            items = json.loads(kube.kubectl("get", kind, "-n", namespace, "-o", "json").stdout)["items"]
            # What Kubernetes itself puts in every namespace stays; nothing of the operator's comes.
            made = [i["metadata"]["name"] for i in items if i["metadata"]["name"] not in ("default",)]
            assert not made, (kind, made)
    finally:
        kube.kubectl("delete", "lns", name, "--wait=false", check=False)
        kube.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


@pytest.mark.parametrize("who", ["operator", "admin"])
def test_a_namespace_created_after_the_watch_showed_its_name_free_is_given_back(
        kube: Kube, s3: S3Info, operator_kubeconfig: Path, uid: str, who: str) -> None:
    """The race the Namespaces' watch leaves open: an admin creates the namespace a new learner maps
    to after the operator last saw that name free, and the operator applies it as new. As the
    operator's ServiceAccount, the confinement policy refuses the apply; with credentials no policy
    binds (a cluster installed without the policies), the operator sees another field manager in
    the answer and takes back what its apply added. Either way the learner gets NamespaceConflict,
    and the namespace is as the admin left it, with nothing of the operator's in it."""
    from kubernetes import config as kube_config
    from privatefm_operator import naming
    from privatefm_operator.api import LearnerNamespace
    from privatefm_operator.kube import Kube as OperatorKube
    from privatefm_operator.reconcilers.base import Clients, Step
    from privatefm_operator.reconcilers.learner import LearnerReconciler, LearnerScope, learner_of
    from privatefm_operator.settings import Settings
    from privatefm_operator.storage import Storage

    learner_id = f"race{who[0]}{uid}"
    namespace = naming.namespace_name(learner_id, naming.ns_uid(learner_id))
    kube.kubectl("create", "namespace", namespace)
    try:
        kube.kubectl("label", "namespace", namespace, "team=research")
        before = get(kube, "namespace", namespace)["metadata"]
        settings = Settings(s3_endpoint=s3.endpoint, s3_bucket=s3.bucket, s3_access_key=s3.operator.access_key,
                            s3_secret_key=s3.operator.secret_key, merge_image="privatefm/merge:test")
        config = str(operator_kubeconfig) if who == "operator" else str(kube.kubeconfig)
        learners = LearnerReconciler(Clients(OperatorKube(kube_config.new_client_from_config(config)),
                                             Storage(settings), settings))
        learners.children.namespaces_listed.set()  # the watch listed every namespace before this one came
        lns = LearnerNamespace.model_validate({
            "apiVersion": "privatefm.io/v1alpha1", "kind": "LearnerNamespace",
            "metadata": {"name": f"race-{who}-{uid}", "generation": 1, "resourceVersion": "1", "uid": "u"},
            "spec": {"learnerId": learner_id, "baseModel": {"name": seed.BASE_MODEL},
                     "guardians": [{"kind": "User", "name": "guardian"}]}})
        scope = LearnerScope(lns, learner=learner_of(lns))
        assert learners.provision(scope) is Step.DONE
        assert scope.claim_problem is not None and scope.claim_problem.reason == "NamespaceConflict", scope
        after = get(kube, "namespace", namespace)["metadata"]
        assert after.get("labels") == before.get("labels")
        assert {f["manager"] for f in after.get("managedFields") or []} <= {"kubectl-create", "kubectl-label",
                                                                            "privatefm-operator"}
        for kind in ("serviceaccounts", "networkpolicies", "resourcequotas", "limitranges", "cronjobs"):
            items = json.loads(kube.kubectl("get", kind, "-n", namespace, "-o", "json").stdout)["items"]
            assert [i["metadata"]["name"] for i in items if i["metadata"]["name"] != "default"] == [], kind
    finally:
        kube.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def test_a_recreated_learner_readopts_its_namespace_and_history(kube: Kube, learner: LearnerHandle) -> None:
    learner.request_merge("before")
    assert learner.wait_merge("before")["status"]["phase"] == "Succeeded"
    before = learner.status()
    netpol_uid = get(kube, "networkpolicy", "privatefm-isolation", "-n", learner.namespace)["metadata"]["uid"]
    manifest = get(kube, "lns", learner.name)
    # The CR vanishes without the operator's deletion flow (the break-glass path of a stuck uninstall):
    # a cluster admin deletes it and strips its finalizers. Nothing cascades.
    kube.kubectl("delete", "lns", learner.name, "--wait=false")
    kube.kubectl("patch", "lns", learner.name, "--type=merge", "-p", json.dumps({"metadata": {"finalizers": None}}))
    wait_for(lambda: not get(kube, "lns", learner.name), 30, "the CR to vanish")
    assert get(kube, "networkpolicy", "privatefm-isolation", "-n", learner.namespace)["metadata"]["uid"] == netpol_uid
    assert get(kube, "namespace", learner.namespace)["status"]["phase"] == "Active"
    again = {k: manifest[k] for k in ("apiVersion", "kind", "spec")} | {"metadata": {"name": learner.name}}
    kube.kubectl("apply", "-f", "-", input=json.dumps(again))
    kube.kubectl("wait", "--for=condition=Ready", f"lns/{learner.name}", "--timeout=60s")
    after = learner.status()
    assert (after["namespace"], after["nsUid"]) == (before["namespace"], before["nsUid"])
    assert after["currentCheckpoint"]["version"] == before["currentCheckpoint"]["version"] == 1
    assert after["currentCheckpoint"]["manifestSha256"] == before["currentCheckpoint"]["manifestSha256"]
    assert after["lastAssignedVersion"] >= 1
    assert get(kube, "networkpolicy", "privatefm-isolation", "-n", learner.namespace)["metadata"]["uid"] == netpol_uid
    learner.request_merge("after")
    status = learner.wait_merge("after")["status"]
    assert status["phase"] == "Succeeded" and status["targetVersion"] == 2 and status["parentVersion"] == 1


# ---- 14. guardian-approved, delayed deletion -------------------------------------------------
def learner_objects(s3: S3Info, ns_uid: str) -> list[str]:
    listed = s3.client().list_objects_v2(Bucket=s3.bucket, Prefix=f"{layout.learner_prefix(ns_uid)}/")
    return [o["Key"] for o in listed.get("Contents", [])]


def set_delay(kube: Kube, learner: LearnerHandle, delay: str) -> None:
    kube.kubectl("patch", "lns", learner.name, "--type=merge", "-p", json.dumps({"spec": {"deletionDelay": delay}}))


def test_deletion_waits_for_a_guardian_and_the_delay_then_removes_everything(
        kube: Kube, learner: LearnerHandle, s3: S3Info, base_model: str) -> None:
    learner.request_merge("kept")
    assert learner.wait_merge("kept")["status"]["phase"] == "Succeeded"
    set_delay(kube, learner, "6s")
    objects = learner_objects(s3, learner.ns_uid)
    assert objects
    kube.kubectl("delete", "lns", learner.name, "--wait=false")
    held = wait_for(lambda: learner.status().get("phase") == "AwaitingGuardian" and learner.status(), 20,
                    "AwaitingGuardian")
    assert held["deletion"]["requestedAt"] and not held["deletion"].get("approvedBy")
    assert learner.events("DeletionRequested")
    time.sleep(4)  # unapproved: nothing goes, however long it waits
    assert get(kube, "namespace", learner.namespace)["status"]["phase"] == "Active"
    assert get(kube, "networkpolicy", "privatefm-isolation", "-n", learner.namespace)
    assert learner_objects(s3, learner.ns_uid) == objects

    learner.approve_deletion()
    approved = wait_for(lambda: (d := learner.status().get("deletion") or {}).get("approvedBy") and d, 20,
                        "the approval to be recorded")
    assert approved["approvedBy"] == GUARDIAN
    requested, at = (datetime.fromisoformat(approved[k].replace("Z", "+00:00")) for k in ("requestedAt", "approvedAt"))
    not_before = datetime.fromisoformat(approved["notBefore"].replace("Z", "+00:00"))
    assert not_before == max(requested, at) + timedelta(seconds=6)
    assert get(kube, "namespace", learner.namespace)["status"]["phase"] == "Active"  # the delay still runs
    wait_for(lambda: not get(kube, "lns", learner.name), 90, "the LearnerNamespace to be gone")
    assert datetime.now(UTC) >= not_before
    assert not get(kube, "namespace", learner.namespace) or \
        get(kube, "namespace", learner.namespace)["status"]["phase"] == "Terminating"
    assert learner_objects(s3, learner.ns_uid) == []
    shards = [o["Key"].rsplit("/", 1)[1] for o in s3.client().list_objects_v2(
        Bucket=s3.bucket, Prefix=layout.base_prefix(seed.BASE_MODEL, 1) + "/")["Contents"]]
    assert S3Store(s3.client(), s3.bucket, layout.checkpoint_prefix(learner.ns_uid, 1)).incomplete_uploads(
        names=shards) == []
    assert s3.client().head_object(Bucket=s3.bucket, Key=f"{layout.base_prefix(seed.BASE_MODEL, 1)}/manifest.json")
    audits = s3.client().list_objects_v2(Bucket=s3.bucket, Prefix=f"audit/{learner.ns_uid}/").get("Contents", [])
    assert len(audits) == 1
    record = json.loads(s3.client().get_object(Bucket=s3.bucket, Key=audits[0]["Key"])["Body"].read())
    assert (record["approvedBy"], record["storeObjectsRemoved"]) == (GUARDIAN, len(objects))
    assert record["storeBytesRemoved"] > 0 and record["namespace"] == learner.namespace
    assert learner.events("LearnerDeleted")


def test_a_group_guardian_approves_and_a_non_guardian_cannot(kube: Kube, learner: LearnerHandle,
                                                             s3: S3Info) -> None:
    """A learner guarded by a group: a member approves in their own name; before the group was listed,
    the same person (bound to privatefm-guardian) was refused by the guardian-approval policy."""
    groups = (GUARDIAN_GROUP, "system:authenticated")
    denied = kube.kubectl("annotate", "--overwrite", "lns", learner.name, f"{APPROVAL}={GROUP_MEMBER}", check=False,
                          as_user=GROUP_MEMBER, as_groups=groups)
    assert denied.returncode != 0, denied.stdout
    assert "ValidatingAdmissionPolicy 'privatefm-operator-guardian-approval'" in denied.stderr, denied.stderr
    assert (f"only a guardian listed in spec.guardians may set, change or remove {APPROVAL}; {GROUP_MEMBER} "
            f"is not a guardian of LearnerNamespace {learner.name}") in denied.stderr, denied.stderr

    guardians = [{"kind": "User", "name": GUARDIAN}, {"kind": "Group", "name": GUARDIAN_GROUP}]
    kube.kubectl("patch", "lns", learner.name, "--type=merge",
                 "-p", json.dumps({"spec": {"guardians": guardians, "deletionDelay": "3s"}}))
    objects = learner_objects(s3, learner.ns_uid)
    kube.kubectl("delete", "lns", learner.name, "--wait=false")
    wait_for(lambda: learner.status().get("phase") == "AwaitingGuardian", 20, "AwaitingGuardian")
    kube.kubectl("annotate", "--overwrite", "lns", learner.name, f"{APPROVAL}={GROUP_MEMBER}",
                 as_user=GROUP_MEMBER, as_groups=groups)
    wait_for(lambda: not get(kube, "lns", learner.name), 90, "the LearnerNamespace to be gone")
    assert not get(kube, "namespace", learner.namespace) or \
        get(kube, "namespace", learner.namespace)["status"]["phase"] == "Terminating"
    assert learner_objects(s3, learner.ns_uid) == []
    audits = s3.client().list_objects_v2(Bucket=s3.bucket, Prefix=f"audit/{learner.ns_uid}/").get("Contents", [])
    assert len(audits) == 1
    record = json.loads(s3.client().get_object(Bucket=s3.bucket, Key=audits[0]["Key"])["Body"].read())
    assert (record["approvedBy"], record["storeObjectsRemoved"]) == (GROUP_MEMBER, len(objects))


def test_revoking_the_approval_stops_the_deletion(kube: Kube, learner: LearnerHandle) -> None:
    set_delay(kube, learner, "8s")
    kube.kubectl("delete", "lns", learner.name, "--wait=false")
    learner.approve_deletion()
    wait_for(lambda: (learner.status().get("deletion") or {}).get("approvedBy"), 20, "the approval")
    kube.kubectl("annotate", "lns", learner.name, f"{APPROVAL}-", as_user=GUARDIAN,
                 as_groups=("system:authenticated",))
    wait_for(lambda: not (learner.status().get("deletion") or {}).get("approvedBy"), 20, "the revocation")
    assert learner.events("DeletionRevoked")
    time.sleep(10)  # past the old notBefore
    assert get(kube, "lns", learner.name) and get(kube, "namespace", learner.namespace)["status"]["phase"] == "Active"
    assert learner.status()["phase"] == "AwaitingGuardian"


def test_operator_restarts_never_delete_early_and_always_finish(kube: Kube, learner: LearnerHandle,
                                                                operator: OperatorProcess, s3: S3Info) -> None:
    set_delay(kube, learner, "10s")
    kube.kubectl("delete", "lns", learner.name, "--wait=false")
    learner.approve_deletion()
    approved = wait_for(lambda: (d := learner.status().get("deletion") or {}).get("notBefore") and d, 20,
                        "the approval")
    not_before = datetime.fromisoformat(approved["notBefore"].replace("Z", "+00:00"))
    operator.kill()  # between the approval and the delay
    time.sleep(2)
    operator.start()
    while datetime.now(UTC) < not_before - timedelta(seconds=1):
        assert get(kube, "namespace", learner.namespace)["status"]["phase"] == "Active", "deleted before notBefore"
        time.sleep(0.5)
    wait_for(lambda: (learner.status().get("deletion") or {}).get("startedAt"), 30, "the deletion to start")
    operator.kill()  # mid-deletion
    time.sleep(2)
    operator.start()
    wait_for(lambda: not get(kube, "lns", learner.name), 90, "the deletion to finish after a restart")
    assert learner_objects(s3, learner.ns_uid) == []
    assert s3.client().list_objects_v2(Bucket=s3.bucket, Prefix=f"audit/{learner.ns_uid}/").get("KeyCount") == 1


# ---- 15. a CRD reinstall loses nothing -------------------------------------------------------
def test_crd_reinstall_with_twenty_learners_keeps_every_learner(kube: Kube, operator: OperatorProcess, s3: S3Info,
                                                                uid: str, request: pytest.FixtureRequest) -> None:
    """The CRDs are deleted (an uninstall, a botched upgrade). With the guardian finalizer the CRD
    stays Terminating; a cluster admin strips the finalizers (the break-glass path of a stuck
    uninstall), so every CR vanishes without the operator's deletion flow. Re-applying the CRDs
    and the same manifests brings every learner back on its old namespace, nsUid and checkpoint,
    and their isolation never went away."""
    sample = yaml.safe_load((REPO / "manifests" / "samples" / "learnernamespace-minimal.yaml").read_text())
    manifests = []
    for i in range(20):
        body = copy.deepcopy(sample)
        body["metadata"]["name"], body["spec"]["learnerId"] = f"fleet-{uid}-{i}", f"f{uid}-{i}"
        manifests.append(body)
    fleet = {"apiVersion": "v1", "kind": "List", "items": manifests}
    kube.kubectl("apply", "-f", "-", input=json.dumps(fleet))
    names = [m["metadata"]["name"] for m in manifests]
    kube.kubectl("wait", "--for=condition=Ready", *(f"lns/{n}" for n in names), "--timeout=120s")
    handles: list[LearnerHandle] = []
    request.addfinalizer(lambda: [handle.delete() for handle in handles])  # even when the test fails
    for name, body in zip(names, manifests, strict=True):
        status = get(kube, "lns", name)["status"]
        handle = LearnerHandle(kube, s3, name, body["spec"]["learnerId"], status["namespace"], status["nsUid"])
        handle.publish_adapter(1)
        handle.request_merge("first")
        handles.append(handle)
    for handle in handles:
        assert handle.wait_merge("first", timeout=300)["status"]["phase"] == "Succeeded"
    before = {h.name: h.status() for h in handles}
    policies = {h.namespace: get(kube, "networkpolicy", "privatefm-isolation", "-n", h.namespace)["metadata"]["uid"]
                for h in handles}

    kube.kubectl("delete", "crd", "learnernamespaces.privatefm.io", "adaptermerges.privatefm.io", "--wait=false")
    time.sleep(3)
    crd = get(kube, "crd", "learnernamespaces.privatefm.io")
    assert crd and crd["metadata"].get("deletionTimestamp"), "held Terminating by the guardian finalizers"
    for item in get(kube, "lns").get("items", []):  # break glass, for every learner still held
        kube.kubectl("patch", "lns", item["metadata"]["name"], "--type=merge", "-p",
                     json.dumps({"metadata": {"finalizers": None}}), check=False)
    wait_for(lambda: not get(kube, "crd", "learnernamespaces.privatefm.io"), 120, "the CRDs to be gone")
    for namespace, policy in policies.items():  # nothing cascaded
        assert get(kube, "networkpolicy", "privatefm-isolation", "-n", namespace)["metadata"]["uid"] == policy

    kube.kubectl("apply", "-k", str(REPO / "crds"))
    kube.wait_established("learnernamespaces.privatefm.io", "adaptermerges.privatefm.io")
    kube.kubectl("apply", "-f", "-", input=json.dumps(fleet))
    kube.kubectl("wait", "--for=condition=Ready", *(f"lns/{n}" for n in names), "--timeout=180s")
    for handle in handles:
        after = handle.status()
        old = before[handle.name]
        assert (after["namespace"], after["nsUid"]) == (old["namespace"], old["nsUid"])
        assert after["currentCheckpoint"]["version"] == old["currentCheckpoint"]["version"] == 1
        assert after["currentCheckpoint"]["manifestSha256"] == old["currentCheckpoint"]["manifestSha256"]
        assert get(kube, "networkpolicy", "privatefm-isolation", "-n", handle.namespace)["metadata"]["uid"] == \
            policies[handle.namespace]
    # The operator kept serving throughout: a new run on a re-adopted learner takes the next version.
    handles[0].request_merge("second")
    status = handles[0].wait_merge("second")["status"]
    assert status["phase"] == "Succeeded" and status["targetVersion"] == 2


# ---- self-healing: integrity checks, fallback, adapter log -------------------------------------
def new_learner(kube: Kube, s3: S3Info, name: str, learner_id: str, **spec: Any) -> LearnerHandle:
    body = yaml.safe_load((REPO / "manifests" / "samples" / "learnernamespace-minimal.yaml").read_text())
    body["metadata"]["name"], body["spec"]["learnerId"], body["spec"]["deletionDelay"] = name, learner_id, "2s"
    body["spec"].update(spec)
    kube.kubectl("apply", "-f", "-", input=json.dumps(body))
    kube.kubectl("wait", "--for=condition=Ready", f"lns/{name}", "--timeout=60s")
    status = get(kube, "lns", name)["status"]
    return LearnerHandle(kube, s3, name, learner_id, status["namespace"], status["nsUid"])


def event_times(handle: LearnerHandle, reasons: list[str], since: str) -> list[str]:
    """When each of ``reasons`` was first reported for the learner at or after ``since`` (RFC 3339,
    one-second resolution); "" for one that never was."""
    def first(reason: str) -> str:
        times = [e.get("firstTimestamp") or e.get("eventTime") or "" for e in handle.events(reason)]
        return min((t for t in times if t >= since), default="")
    return [first(r) for r in reasons]


def shard_digests(manifest: dict[str, Any]) -> dict[str, str]:
    return {f["name"]: f["sha256"] for f in manifest["files"]}


def corrupt(s3: S3Info, prefix: str, how: str) -> str:
    """Damages the checkpoint at ``prefix`` as a failing disk or a careless person would; returns
    the file it damaged."""
    client = s3.client()
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=s3.bucket, Prefix=f"{prefix}/")["Contents"])
    shard = next(k for k in keys if k.endswith(".safetensors"))
    if how == "manifest":
        client.delete_object(Bucket=s3.bucket, Key=f"{prefix}/{layout.MANIFEST_NAME}")
        return layout.MANIFEST_NAME
    if how == "delete":
        client.delete_object(Bucket=s3.bucket, Key=shard)
    else:
        data = bytearray(client.get_object(Bucket=s3.bucket, Key=shard)["Body"].read())
        if how == "truncate":
            del data[len(data) // 2:]
        else:  # flip one byte, same size
            data[len(data) - 7] ^= 0x01
        # "flip-checksummed": rewritten by a client that sends a checksum, which the store keeps.
        extra = {"ChecksumAlgorithm": "SHA256"} if how == "flip-checksummed" else {}
        client.put_object(Bucket=s3.bucket, Key=shard, Body=bytes(data), **extra)
    return shard.rsplit("/", 1)[-1]


@pytest.mark.parametrize(("how", "reason"), [("truncate", "SizeMismatch"), ("delete", "FileMissing"),
                                              ("manifest", "ManifestMissing"),
                                              ("flip-checksummed", "ChecksumMismatch"), ("flip", "ChecksumMismatch")])
def test_a_damaged_checkpoint_is_detected_named_and_rebuilt_from_the_adapter_log(
        learner: LearnerHandle, s3: S3Info, operator: OperatorProcess, how: str, reason: str) -> None:
    learner.publish_adapter(2, mode="incremental")
    learner.request_merge("first")
    first = learner.wait_merge("first")["status"]
    assert first["phase"] == "Succeeded" and first["adapterSeqs"] == [1, 2]
    since = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    check = "deep" if how == "flip" else "cheap"
    detected_metric = f'privatefm_corruption_detected_total{{check="{check}",reason="{reason}"}}'  # sorted labels
    fallback_metric = 'privatefm_fallback_operations_total{reason="Corruption",result="succeeded"}'
    before = operator.metrics()
    damaged = corrupt(s3, layout.checkpoint_prefix(learner.ns_uid, 1), how)
    if how == "flip":  # same size, and no checksum kept by the store: only rehashing every byte shows it
        time.sleep(12)  # a cheap check (every 10 s here) passes it
        assert learner.status()["currentCheckpoint"]["version"] == 1
        learner.kube.kubectl("annotate", "lns", learner.name, "privatefm.io/verify-requested=now")

    # The cheap check (every 10 s here) or the deep check (a verify Job) finds it, names it, and takes
    # v1 out of currentCheckpoint.
    integrity = learner.wait_status(lambda s: (s.get("integrity") or {}).get("failedVersion") == 1
                                    and s["integrity"], f"the {how} to be detected", timeout=60)
    assert (integrity["reason"], integrity["file"]) == (reason, damaged)
    # The fallback replays the adapter log into a new verified version.
    status = learner.wait_status(lambda s: (s.get("currentCheckpoint") or {}).get("version", 0) > 1
                                 and (s.get("recovery") or {}).get("completedAt") and s,
                                 "the fallback to produce a new version", timeout=120)
    recovery = status["recovery"]
    assert recovery["reason"] == "Corruption" and recovery["completedAt"] and recovery["attempts"] == 0
    fallback = learner.merge(recovery["merge"])
    assert fallback["spec"]["trigger"] == "Fallback"
    assert fallback["status"]["adapterSeqs"] == [1, 2] and fallback["status"]["phase"] == "Succeeded"
    replayed = status["currentCheckpoint"]
    assert replayed["adapterSeqs"] == [1, 2] and "failedVersion" not in (status.get("integrity") or {})
    learner.wait_status(lambda s: s["phase"] == "Ready", "the learner to be Ready again")
    detected, initiated, completed = event_times(
        learner, ["CorruptionDetected", "FallbackInitiated", "FallbackCompleted"], since)
    assert "" < detected <= initiated < completed  # a merge lies between the last two
    degraded = learner.events("CorruptionDetected")[-1]["message"]
    assert reason in degraded and damaged in degraded and f"the {check} check" in degraded
    after = operator.metrics()
    assert after.get(detected_metric, 0) - before.get(detected_metric, 0) >= 1, detected_metric
    assert after.get(fallback_metric, 0) - before.get(fallback_metric, 0) >= 1, fallback_metric

    # The replay is the same bytes as a fresh merge of the same log on the same base.
    learner.request_merge("fresh")
    fresh = learner.wait_merge("fresh")["status"]["checkpoint"]
    assert shard_digests(learner.manifest(fresh["version"])) == shard_digests(learner.manifest(replayed["version"]))
    assert learner.manifest(replayed["version"])["adapterSeqs"] == [1, 2]


def test_three_incremental_adapters_are_folded_in_one_run(kube: Kube, s3: S3Info, operator: OperatorProcess,
                                                          uid: str) -> None:
    handle = new_learner(kube, s3, f"incr-{uid}", f"i{uid}")
    try:
        for seq in (1, 2, 3):
            handle.publish_adapter(seq, mode="incremental")
        handle.request_merge("all")
        status = handle.wait_merge("all")["status"]
        assert status["phase"] == "Succeeded" and status["adapterSeqs"] == [1, 2, 3]
        assert handle.manifest(status["targetVersion"])["adapterSeqs"] == [1, 2, 3]
        # A cumulative adapter replaces what came before it.
        handle.publish_adapter(4)
        handle.publish_adapter(5, mode="incremental")
        handle.request_merge("after-cumulative")
        assert handle.wait_merge("after-cumulative")["status"]["adapterSeqs"] == [4, 5]
    finally:
        handle.delete()


def test_lag_beyond_three_versions_falls_back_unless_pinned(kube: Kube, s3: S3Info, operator: OperatorProcess,
                                                            uid: str) -> None:
    model = f"lag-{uid}"
    publisher = s3.publisher.client(retries=3)
    seed.publish_base(publisher, s3.bucket, model=model, version=1)
    spec = {"baseModel": {"name": model}}
    free = new_learner(kube, s3, f"lag-{uid}", f"g{uid}", **spec)
    pinned = new_learner(kube, s3, f"pin-{uid}", f"p{uid}", baseModel={"name": model, "version": 1})
    try:
        for handle in (free, pinned):
            handle.publish_adapter(1)
            handle.request_merge("first")
            assert handle.wait_merge("first")["status"]["phase"] == "Succeeded"
        for version in (2, 3, 4):
            seed.publish_base(publisher, s3.bucket, model=model, version=version)
        free.wait_status(lambda s: s.get("versionLag") == 3, "lag 3", timeout=60)
        time.sleep(8)  # a few resyncs: lag 3 is within maxVersionLag
        status = free.status()
        assert status.get("recovery") is None and status["currentCheckpoint"]["baseVersion"] == 1
        assert status["phase"] == "Ready"

        seed.publish_base(publisher, s3.bucket, model=model, version=5)
        status = free.wait_status(lambda s: (s.get("currentCheckpoint") or {}).get("baseVersion") == 5
                                  and (s.get("recovery") or {}).get("completedAt") and s,
                                  "the lagging learner to fall back to v5", timeout=120)
        assert status["recovery"]["reason"] == "VersionLag" and status["versionLag"] == 0
        assert status["currentCheckpoint"]["adapterSeqs"] == [1]
        assert free.events("FallbackInitiated") and free.events("FallbackCompleted")
        pinned_status = pinned.wait_status(lambda s: s.get("versionLag") == 4 and s, "the pinned lag to show")
        time.sleep(6)
        pinned_status = pinned.status()
        assert pinned_status.get("recovery") is None and pinned_status["currentCheckpoint"]["baseVersion"] == 1
        assert pinned_status["versionLag"] == 4
    finally:
        free.delete()
        pinned.delete()


def test_a_fallback_that_always_fails_backs_off_then_stalls(learner: LearnerHandle) -> None:
    learner.publish_adapter(2, corrupt=True)  # a cumulative adapter that never fits the base
    learner.kube.kubectl("annotate", "--overwrite", "lns", learner.name, "privatefm.io/fallback-requested=try-1")
    status = learner.wait_status(lambda s: (s.get("recovery") or {}).get("failedAt") and s,
                                 "the fallback to give up", timeout=180)
    assert status["recovery"]["attempts"] == 3 and status["recovery"]["reason"] == "Requested"
    stalled = next(c for c in status["conditions"] if c["type"] == "Stalled")
    assert (stalled["status"], stalled["reason"]) == ("True", "FallbackFailed") and status["phase"] == "Failed"
    merges = [learner.merge(f"fallback-1-{n}") for n in (1, 2, 3)]
    assert [m["status"]["phase"] for m in merges] == ["Failed"] * 3
    assert {m["status"]["reason"] for m in merges} == {"ShapeMismatch"}
    created = [datetime.fromisoformat(m["metadata"]["creationTimestamp"].replace("Z", "+00:00")) for m in merges]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(created)]
    assert gaps[0] >= 5 and gaps[1] >= 10 and gaps[1] > gaps[0], gaps  # 5 s, then 10 s, after each failure
    assert len(learner.events("FallbackFailed")) == 1 and len(learner.events("FallbackRetrying")) == 2
    assert learner.merge("fallback-1-4") == {}
    # A new request starts over.
    learner.kube.kubectl("annotate", "--overwrite", "lns", learner.name, "privatefm.io/fallback-requested=try-2")
    learner.wait_status(lambda s: (s.get("recovery") or {}).get("id") == 2, "a new fallback to start")


def test_a_learner_without_adapters_falls_back_to_a_server_side_reclone(kube: Kube, s3: S3Info,
                                                                        operator: OperatorProcess, uid: str) -> None:
    handle = new_learner(kube, s3, f"clone-{uid}", f"c{uid}")
    try:
        kube.kubectl("annotate", "lns", handle.name, "privatefm.io/fallback-requested=first")
        status = handle.wait_status(lambda s: (s.get("recovery") or {}).get("completedAt") and s, "the re-clone")
        merge = handle.merge(status["recovery"]["merge"])["status"]
        assert (merge["phase"], merge["reason"], merge["adapterSeqs"]) == ("Succeeded", "Recloned", [])
        assert get(kube, "job", status["recovery"]["merge"], "-n", handle.namespace) == {}  # no Job, no pod
        current = status["currentCheckpoint"]
        manifest = handle.manifest(current["version"])
        base = json.loads(S3Store(s3.client(), s3.bucket, layout.base_prefix(seed.BASE_MODEL, 1)).read_bytes(
            layout.MANIFEST_NAME))
        assert shard_digests(manifest) == shard_digests(base) and manifest["version"] == current["version"]
        assert handle.status()["phase"] == "Ready"
    finally:
        handle.delete()


def test_nothing_ever_writes_under_base(s3: S3Info, base_model: str, operator: OperatorProcess) -> None:
    """Runs last in this module (which merged, fell back and re-cloned many times): every object
    under base/ is byte-identical to what its publisher wrote, which the publisher sealed with sha256."""
    store = S3Store(s3.client(), s3.bucket, layout.BASE_ROOT)
    manifests = [info.name for info in store.list_files() if info.name.endswith(f"/{layout.MANIFEST_NAME}")]
    assert manifests
    for name in manifests:
        version_dir = name.rsplit("/", 1)[0]
        for entry in json.loads(store.read_bytes(name))["files"]:
            assert store.digest(f"{version_dir}/{entry['name']}").sha256 == entry["sha256"], (version_dir, entry)
