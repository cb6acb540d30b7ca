"""Chaos on the real control plane and S3 server (issue 14): components die under the operator
while it works, and everything still converges, with no duplicate and no partial result.

- kube-apiserver restarted, and etcd restarted, in the middle of a rollout: the operator (a real
  process, never restarted here) reconnects by itself and every learner becomes Ready;
- the S3 server stopped in the middle of a merge storm, with one merge pod's upload cut halfway
  (``privatefm_testing.storeproxy``), then started again: every run ends Succeeded or Failed with a
  reason, and no partial version ever becomes current;
- the operator SIGKILLed again and again at random points of a rollout with merges in flight:
  every learner Ready, no duplicate Job or AdapterMerge, no version reused or skipped.

The control plane's components are stopped and started by ``LocalCluster.restart`` /
``stop_component`` / ``start_component`` (same flags, ports, certificates and data). Every test is
bounded by its waits' timeouts; every process a test stops is started again before it ends.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import re
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from privatefm_merge import layout
from privatefm_merge.store import S3Store
from privatefm_merge.verify import verify_checkpoint
from privatefm_testing import seed
from privatefm_testing.cluster import ClusterState, LocalCluster, S3Info, pid_alive
from privatefm_testing.kube import Kube, wait_for
from privatefm_testing.operator_proc import OperatorProcess
from privatefm_testing.podrunner import Hooks, PodRunner
from privatefm_testing.storeproxy import StoreProxy
from test_operator import APPROVAL, GUARDIAN, LearnerHandle, get

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
GROUP, VERSION = "privatefm.io", "v1alpha1"
MERGE_JOBS = "app.kubernetes.io/managed-by=privatefm-operator,app.kubernetes.io/component=merge"
LIMIT = 3  # merge Jobs at once, cluster-wide, for this module's operator
FINISHED = ("Succeeded", "Failed")


@pytest.fixture(scope="module")
def cluster(kube: Kube) -> LocalCluster:
    if kube.local is None or kube.local.state is None:
        pytest.skip("restarting the control plane's components needs the local cluster (--cluster=local)")
    return kube.local


@pytest.fixture(scope="module")
def chaos_operator(operator: OperatorProcess, podrunner: Any) -> Iterator[OperatorProcess]:
    """The session's operator with a merge limit (put back afterwards); merge pods in the quick lane."""
    if not isinstance(podrunner, PodRunner):
        pytest.skip("the chaos tests hold merge pods' reports through the local pod runner")
    with operator.restarted(PRIVATEFM_MERGE_CONCURRENCY=str(LIMIT)) as limited:
        yield limited


@pytest.fixture
def store_proxy(chaos_operator: OperatorProcess, s3: S3Info) -> Iterator[StoreProxy]:
    """A proxy in front of the store that the chaos operator, and so its merge pods, go through."""
    store = urlsplit(s3.endpoint)
    assert store.hostname and store.port
    proxy = StoreProxy((store.hostname, store.port)).start()
    try:
        with chaos_operator.restarted(PRIVATEFM_S3_ENDPOINT=proxy.url):
            yield proxy
    finally:
        proxy.stop()


# ---- helpers -------------------------------------------------------------------------------------
def fleet_bodies(prefix: str, uid: str, count: int) -> list[dict[str, Any]]:
    sample = yaml.safe_load((REPO / "manifests" / "samples" / "learnernamespace-minimal.yaml").read_text())
    bodies = []
    for i in range(count):
        body = copy.deepcopy(sample)
        body["metadata"]["name"] = f"{prefix}-{uid}-{i}"
        body["spec"].update(learnerId=f"{prefix}{uid}-{i}", deletionDelay="2s")
        bodies.append(body)
    return bodies


def apply_fleet(kube: Kube, bodies: list[dict[str, Any]], timeout: float = 120) -> None:
    """Creates (applies) the learners; while the API server is away, tries again until ``timeout``."""
    fleet = json.dumps({"apiVersion": "v1", "kind": "List", "items": bodies})
    wait_for(lambda: kube.kubectl("apply", "-f", "-", input=fleet, check=False).returncode == 0, timeout,
             f"{len(bodies)} learners to be applied", interval=1)


def learners(kube: Kube, names: list[str]) -> dict[str, dict[str, Any]]:
    """name -> LearnerNamespace, for those of ``names`` that exist (one LIST)."""
    wanted = set(names)
    return {item["metadata"]["name"]: item for item in get(kube, "lns").get("items", [])
            if item["metadata"]["name"] in wanted}


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == kind), {})


def is_ready(obj: dict[str, Any]) -> bool:
    status = obj.get("status") or {}
    return (condition(obj, "Ready").get("status") == "True"
            and status.get("observedGeneration") == obj["metadata"].get("generation"))


def ready_names(kube: Kube, names: list[str]) -> set[str]:
    return {name for name, obj in learners(kube, names).items() if is_ready(obj)}


def wait_all_ready(kube: Kube, names: list[str], timeout: float) -> dict[str, dict[str, Any]]:
    def all_ready() -> dict[str, dict[str, Any]] | None:
        found = learners(kube, names)
        ready = {name for name, obj in found.items() if is_ready(obj)}
        if len(ready) == len(names):
            return found
        missing = sorted(set(names) - ready)
        print(f"{len(ready)}/{len(names)} Ready; e.g. not yet: {missing[:3]}")
        return None
    return dict(wait_for(all_ready, timeout, f"all {len(names)} learners to be Ready", interval=3))


def delete_fleet(kube: Kube, names: list[str], timeout: float = 120) -> None:
    """As the product intends (a request, then the guardian's approval), by a few kubectl calls side
    by side (one object at a time each, on a loaded API server); waits, bounded, so that the next
    test does not run beside a mass deletion."""
    began = time.monotonic()
    chunks = [names[i::4] for i in range(4) if names[i::4]]

    def request(chunk: list[str]) -> None:
        kube.kubectl("delete", "lns", *chunk, "--wait=false", "--ignore-not-found", check=False)
        kube.kubectl("annotate", "--overwrite", "lns", *chunk, f"{APPROVAL}={GUARDIAN}", check=False,
                     as_user=GUARDIAN, as_groups=("system:authenticated",))
    threads = [threading.Thread(target=request, args=(chunk,)) for chunk in chunks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with contextlib.suppress(AssertionError):
        wait_for(lambda: not learners(kube, names), timeout, "the chaos learners to be deleted", interval=3)
    print(f"{len(names)} learners deleted in {time.monotonic() - began:.0f}s")


def handle_of(kube: Kube, s3: S3Info, obj: dict[str, Any]) -> LearnerHandle:
    status = obj["status"]
    return LearnerHandle(kube, s3, obj["metadata"]["name"], obj["spec"]["learnerId"], status["namespace"],
                         status["nsUid"])


class Recorder:
    """Every object of one kind the API server ever showed, from a watch that starts again after
    the API server (or the watch) goes away: what ever existed (by uid), and every status seen."""

    def __init__(self, kube: Kube, kind: str, keep: Callable[[dict[str, Any]], bool] = lambda _: True) -> None:
        from kubernetes import client

        self.api = kube.api_client()
        self.kind = kind
        self.keep = keep
        self.custom = client.CustomObjectsApi(self.api)
        self.batch = client.BatchV1Api(self.api)
        self.uids: dict[tuple[str, str], set[str]] = defaultdict(set)  # (namespace, name) -> uids
        self.seen: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)  # -> every version seen
        self.when: dict[tuple[str, str], list[float]] = defaultdict(list)  # -> when each was seen (monotonic)
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._watch: Any = None
        self.thread = threading.Thread(target=self._run, name=f"recorder {kind}", daemon=True)

    def _stream(self) -> Iterator[dict[str, Any]]:
        from kubernetes import watch

        self._watch = watch.Watch()
        if self.kind == "jobs":
            return self._watch.stream(self.batch.list_job_for_all_namespaces, label_selector=MERGE_JOBS,
                                      timeout_seconds=300)
        return self._watch.stream(self.custom.list_cluster_custom_object, GROUP, VERSION, self.kind,
                                  timeout_seconds=300)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):  # the API server restarted, or the watch expired
                for event in self._stream():
                    obj = event.get("raw_object") or {}
                    meta = obj.get("metadata") or {}
                    if not meta or not self.keep(obj):
                        continue
                    key = (meta.get("namespace") or "", meta["name"])
                    with self.lock:
                        self.uids[key].add(meta["uid"])
                        self.seen[key].append(obj)
                        self.when[key].append(time.monotonic())
            self._stop.wait(0.5)

    def ready(self) -> set[str]:
        """Names whose last version seen is Ready=True."""
        with self.lock:
            return {name for (_, name), versions in self.seen.items()
                    if condition(versions[-1], "Ready").get("status") == "True"}

    def ready_since(self, name: str) -> float | None:
        """When the watch first showed ``name`` Ready=True (monotonic), if it did."""
        with self.lock:
            for key, versions in self.seen.items():
                if key[1] == name:
                    return next((t for obj, t in zip(versions, self.when[key], strict=True)
                                 if condition(obj, "Ready").get("status") == "True"), None)
        return None

    def flapped(self) -> dict[str, list[str]]:
        """name -> its Ready history (status/reason), for those that were Ready and later were not."""
        flaps = {}
        with self.lock:
            for (_, name), versions in self.seen.items():
                history = [f"{c.get('status')}/{c.get('reason')}" for c in map(lambda o: condition(o, "Ready"),
                                                                               versions)]
                first = next((i for i, h in enumerate(history) if h.startswith("True/")), None)
                if first is not None and any(not h.startswith("True/") for h in history[first:]):
                    flaps[name] = [h for i, h in enumerate(history) if i == 0 or h != history[i - 1]]
        return flaps

    def unfinished(self, namespaces: set[str]) -> int:
        """How many of the objects (runs) in ``namespaces`` last showed a phase that is not final."""
        with self.lock:
            return sum(1 for (ns, _), versions in self.seen.items()
                       if ns in namespaces and ((versions[-1].get("status") or {}).get("phase") not in FINISHED))

    def __enter__(self) -> Recorder:
        self.thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()
        self.thread.join(timeout=10)


def checkpoints_ever_current(recorder: Recorder) -> dict[str, list[dict[str, Any]]]:
    """learner -> every distinct currentCheckpoint it ever showed, in the order seen."""
    result: dict[str, list[dict[str, Any]]] = defaultdict(list)
    with recorder.lock:
        for (_, name), versions in recorder.seen.items():
            for obj in versions:
                current = (obj.get("status") or {}).get("currentCheckpoint")
                if current and (not result[name] or result[name][-1] != current):
                    result[name].append(current)
    return result


def assert_checkpoint_sound(s3: S3Info, ns_uid: str, checkpoint: dict[str, Any]) -> None:
    """The checkpoint a learner showed as current is a whole, verified version: its manifest and
    every file it lists exist in the store, with the sizes and sha256 the manifest names."""
    version = checkpoint["version"]
    uri = layout.s3_uri(s3.bucket, layout.checkpoint_prefix(ns_uid, version))
    assert checkpoint["uri"] == uri, checkpoint
    report = verify_checkpoint(uri, s3_client=s3.client())
    assert report.exists, f"{uri} was current but has no manifest"
    assert report.ok, f"{uri} was current but does not verify: {report.message}"
    assert report.manifest is not None and report.manifest.version == version
    assert report.manifest_sha256 == checkpoint["manifestSha256"], (report.manifest_sha256, checkpoint)


def assert_versions_sound(status: dict[str, Any], runs: dict[str, dict[str, Any]], where: str) -> None:
    """Each version handed out went to exactly one run (none reused), the handed-out versions are
    1..lastAssignedVersion (none skipped), and the current checkpoint is the newest succeeded run."""
    versions = [run["status"]["targetVersion"] for run in runs.values() if run["status"].get("targetVersion")]
    assert len(versions) == len(set(versions)), f"{where}: a version was handed to two runs: {runs_table(runs)}"
    last = status.get("lastAssignedVersion") or 0
    assert sorted(versions) == list(range(1, last + 1)), \
        f"{where}: versions handed out {sorted(versions)}, lastAssignedVersion {last}: {runs_table(runs)}"
    succeeded = [run["status"]["targetVersion"] for run in runs.values() if run["status"]["phase"] == "Succeeded"]
    current = (status.get("currentCheckpoint") or {}).get("version")
    assert current == (max(succeeded) if succeeded else None), \
        f"{where}: current {current}, succeeded {sorted(succeeded)}: {runs_table(runs)}"


def runs_table(runs: dict[str, dict[str, Any]]) -> str:
    return "; ".join(f"{name}: {(am.get('status') or {}).get('phase')} v{(am.get('status') or {}).get('targetVersion')}"
                     f" {(am.get('status') or {}).get('reason')}" for name, am in sorted(runs.items()))


def merges_in(kube: Kube, namespaces: set[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """namespace -> name -> AdapterMerge (one LIST)."""
    found: dict[str, dict[str, dict[str, Any]]] = {ns: {} for ns in namespaces}
    for item in get(kube, "am", "-A").get("items", []):
        if item["metadata"]["namespace"] in namespaces:
            found[item["metadata"]["namespace"]][item["metadata"]["name"]] = item
    return found


def wait_merges_finished(kube: Kube, namespaces: set[str], expected: int,
                         timeout: float) -> dict[str, dict[str, dict[str, Any]]]:
    def finished() -> dict[str, dict[str, dict[str, Any]]] | None:
        found = merges_in(kube, namespaces)
        runs = [am for by_name in found.values() for am in by_name.values()]
        done = [am for am in runs if (am.get("status") or {}).get("phase") in FINISHED]
        if len(runs) >= expected and len(done) == len(runs):
            return found
        print(f"{len(done)}/{len(runs)} runs finished")
        return None
    return dict(wait_for(finished, timeout, f"all {expected} runs to finish", interval=3))


# ---- 0. the harness: a restarted component is the same component, and nothing is left behind -----
def test_a_restarted_store_keeps_its_address_data_and_identities_and_down_leaves_nothing(
        tmp_path: Path) -> None:
    """A store of its own (not the session's): killed and started again by ``LocalCluster.restart``,
    MinIO answers on the same address with the same objects, users and policies; the recorded PIDs
    follow it, and a stop from another process's view (``privatefm-cluster down`` reads
    cluster.json) leaves no process behind, old or new."""
    store = LocalCluster(tmp_path / "store", kubernetes=False)
    state = store.start()
    pids = [state.pids["minio"]]
    try:
        state.s3.client().put_object(Bucket=state.s3.bucket, Key="base/probe/v1/manifest.json", Body=b"{}")
        pids.append(store.restart("minio", hard=True))
        assert not pid_alive(pids[0]) and pid_alive(pids[1]) and pids[1] != pids[0]
        assert ClusterState.load(tmp_path / "store").pids == {"minio": pids[1]} == state.pids
        # The same endpoint, data and identities: the operator's own user still reads what was there.
        operator = state.s3.operator.client()
        assert operator.get_object(Bucket=state.s3.bucket, Key="base/probe/v1/manifest.json")["Body"].read() == b"{}"
        with pytest.raises(ValueError, match="only etcd"):
            store.restart("kube-controller-manager")
        with pytest.raises(ValueError, match="runs only the S3 server"):
            store.restart("etcd")
    finally:
        LocalCluster(tmp_path / "store", kubernetes=False).stop()  # as `privatefm-cluster down` does
        store.stop()
    assert not [p for p in pids if pid_alive(p)], pids


# ---- 1. the API server and etcd restarted mid-rollout -------------------------------------------
def test_apiserver_and_etcd_restarted_mid_rollout_the_operator_reconnects_and_converges(
        kube: Kube, s3: S3Info, cluster: LocalCluster, chaos_operator: OperatorProcess, uid: str,
        request: pytest.FixtureRequest) -> None:
    """48 learners are created in batches by a creator that keeps trying while the API server is
    away. Right after a batch of 12 (20 learners in all), kube-apiserver is stopped and started
    again (SIGTERM; same flags, port and certificates); right after the next batch of 12 (40 in
    all), etcd is (same data directory and ports). The operator process is never touched: it
    reconnects by itself, and every learner becomes Ready with its children in place; some of each
    big batch were still in the operator's hands when the component went (they became Ready only
    after it was back). 48, not more: the machine has two cores, and an API server restart alone
    takes about 20 s on it."""
    sizes = [4, 4, 12, 4, 4, 12, 4, 4]
    triggers = {3: "kube-apiserver", 6: "etcd"}  # after the 3rd and the 6th batch
    count = sum(sizes)
    bodies = fleet_bodies("cr", uid, count)
    names = [b["metadata"]["name"] for b in bodies]
    request.addfinalizer(lambda: delete_fleet(kube, names))
    assert chaos_operator.proc is not None
    operator_pid = chaos_operator.proc.pid
    created = 0
    failure: list[BaseException] = []
    go = {component: threading.Event() for component in triggers.values()}

    def create() -> None:
        nonlocal created
        try:
            for n, size in enumerate(sizes, start=1):
                apply_fleet(kube, bodies[created:created + size], timeout=180)
                created += size
                if n in triggers:
                    go[triggers[n]].set()
                    time.sleep(1)  # the restart has begun: the next batch meets the outage
                else:
                    time.sleep(0.5)
        except BaseException as err:  # the main thread reports it
            failure.append(err)
        finally:
            for event in go.values():
                event.set()

    began = time.monotonic()
    restarts: dict[str, dict[str, Any]] = {}
    with Recorder(kube, "learnernamespaces", keep=lambda o: o["metadata"]["name"] in names) as statuses:
        creator = threading.Thread(target=create, name="rollout", daemon=True)
        creator.start()
        for component in triggers.values():
            assert go[component].wait(240), f"the rollout never reached the {component} restart"
            assert not failure, failure
            assert cluster.state is not None
            old = cluster.state.pids[component]
            created_before = created
            # Created, and not Ready as the watch last showed it: in the operator's hands right now.
            in_flight = set(names[:created_before]) - statuses.ready()
            t0 = time.monotonic()
            new = cluster.restart(component)
            back = time.monotonic()
            restarts[component] = {"created": created_before, "in flight": in_flight, "took": round(back - t0, 1),
                                   "back": back}
            assert new != old and not pid_alive(old), f"{component}: the old process {old} must be gone"
            assert created_before < count, f"{component} was restarted after the rollout, not during it"
            assert in_flight, f"no learner was in flight when {component} went"
        creator.join(timeout=240)
        assert not creator.is_alive(), "the rollout did not finish creating the learners"
        assert not failure, failure
        found = wait_all_ready(kube, names, timeout=240)
        took = time.monotonic() - began
        time.sleep(2)  # the last status writes reach the watch
    for info in restarts.values():  # how long the learners in flight took once it was back
        waited = [(statuses.ready_since(name) or info["back"]) - info["back"] for name in info["in flight"]]
        info["in flight"], info["ready after"] = len(waited), f"{min(waited):.1f}-{max(waited):.1f}s"
        del info["back"]
    print(f"rollout of {count} with both restarts: all Ready after {took:.0f}s; restarts: {restarts}")
    # A learner once Ready stays Ready through the restarts (nothing about it changed).
    assert not statuses.flapped(), f"Ready learners turned not Ready: {statuses.flapped()}"

    # The operator reconnected by itself: the same process, alive and ready throughout.
    assert chaos_operator.proc is not None and chaos_operator.proc.pid == operator_pid
    assert chaos_operator.proc.poll() is None, chaos_operator.log_tail()
    # The recorded PIDs follow the restarted components (privatefm-cluster down finds them).
    assert cluster.state is not None
    saved = ClusterState.load(Path(cluster.state.dir)).pids
    assert saved == cluster.state.pids and all(pid_alive(p) for p in saved.values()), saved
    assert set(saved.values()) == set(cluster.pids)

    # Every learner converged, with its isolation in place.
    namespaces = {obj["status"]["namespace"] for obj in found.values()}
    assert len(namespaces) == count
    policies = {p["metadata"]["namespace"] for p in get(kube, "networkpolicy", "-A").get("items", [])
                if p["metadata"]["name"] == "privatefm-isolation"}
    crons = {c["metadata"]["namespace"] for c in get(kube, "cronjob", "-A").get("items", [])
             if c["metadata"]["name"] == "nightly-merge"}
    assert namespaces <= policies and namespaces <= crons, sorted(namespaces - (policies & crons))[:5]
    for name, obj in found.items():
        assert obj["status"]["phase"] == "Ready", (name, obj["status"])
        assert condition(obj, "Stalled").get("status") == "False", (name, condition(obj, "Stalled"))
        assert condition(obj, "Reconciling").get("status") == "False", (name, condition(obj, "Reconciling"))


# ---- 2. the store stopped during a merge storm --------------------------------------------------
def test_a_store_outage_during_a_merge_storm_ends_every_run_and_never_makes_a_partial_version_current(
        kube: Kube, s3: S3Info, cluster: LocalCluster, store_proxy: StoreProxy, hooks: Hooks,
        uid: str, request: pytest.FixtureRequest) -> None:
    """8 learners ask for two merges each at once (16 real merges, at most LIMIT=3 running). The
    reports of the first runs to finish are held until the store is down, so the operator accepts
    them during the outage. The operator and the merge pods reach the store through a proxy, which
    then cuts the next checkpoint upload halfway: the store has half of that file's body. MinIO is
    killed there (SIGKILL, as a crash), with merges running, and started again 15 s later (longer
    than the store grace of 8 s). Every run ends Succeeded or Failed with a reason, the cut one
    too; each learner's versions went to one run each, with no gap; every checkpoint any learner
    ever showed as current (a watch sees every status) is whole and verifies (manifest, every file,
    sha256); and every learner is Ready again."""
    count = 8
    bodies = fleet_bodies("cs", uid, count)
    names = [b["metadata"]["name"] for b in bodies]
    request.addfinalizer(lambda: delete_fleet(kube, names))
    proxy = store_proxy
    apply_fleet(kube, bodies)
    handles = [handle_of(kube, s3, obj) for obj in wait_all_ready(kube, names, timeout=120).values()]
    for handle in handles:
        handle.publish_adapter(1)
    namespaces = {h.namespace for h in handles}
    outage = threading.Event()
    held: list[str] = []

    def hold_until_outage(pod: dict[str, Any], code: int) -> None:
        if not outage.is_set() and len(held) < 2:
            held.append(f"{pod['metadata']['namespace']}/{pod['metadata']['name']}")
            outage.wait(120)
    for ns in namespaces:
        hooks.by_namespace[ns] = hold_until_outage
    request.addfinalizer(lambda: [hooks.by_namespace.pop(ns, None) for ns in namespaces])
    request.addfinalizer(outage.set)

    began = time.monotonic()
    with Recorder(kube, "learnernamespaces", keep=lambda o: o["metadata"]["name"] in names) as statuses, \
            Recorder(kube, "jobs", keep=lambda o: o["metadata"]["namespace"] in namespaces) as jobs:
        for handle in handles:
            handle.request_merge("m1")
        for handle in handles:
            handle.request_merge("m2")

        def running() -> int:
            return sum((am.get("status") or {}).get("phase") == "Running"
                       for by_name in merges_in(kube, namespaces).values() for am in by_name.values())
        wait_for(lambda: len(held) == 2 and running() >= LIMIT, 180,
                 "two runs' reports held and merge pods running")
        uids = "|".join(re.escape(h.ns_uid) for h in handles)
        cut = proxy.arm(rf"^PUT /{s3.bucket}/learners/({uids})/checkpoints/v\d+/[^ ?]+\.safetensors[ ?]".encode())
        assert cut.done.wait(120), "no checkpoint upload came through the proxy to be cut"
        assert cluster.state is not None
        old_pid = cluster.state.pids["minio"]
        cluster.stop_component("minio", hard=True)
        down_at = time.monotonic()
        try:
            assert not pid_alive(old_pid) and "minio" not in ClusterState.load(Path(cluster.state.dir)).pids
            outage.set()  # the held runs report now: the operator looks at their output in the outage
            time.sleep(15)
        finally:
            new_pid = cluster.start_component("minio")
            back_at = datetime.now(UTC).replace(microsecond=0)
        assert new_pid != old_pid and ClusterState.load(Path(cluster.state.dir)).pids["minio"] == new_pid
        print(f"store down for {time.monotonic() - down_at:.0f}s, {time.monotonic() - began:.0f}s into the storm")
        found = wait_merges_finished(kube, namespaces, 2 * count, timeout=300)
        final = wait_all_ready(kube, names, timeout=120)  # the learners recover from StoreUnreachable
        time.sleep(2)  # the last status writes reach the watch
    print(f"storm of {2 * count} runs with the outage: all finished after {time.monotonic() - began:.0f}s")

    outcomes: dict[str, int] = defaultdict(int)
    for handle in handles:
        runs = found[handle.namespace]
        assert sorted(runs) == ["m1", "m2"], sorted(runs)
        for name, am in runs.items():
            status = am["status"]
            outcomes[f"{status['phase']}/{status.get('reason')}"] += 1
            assert status["phase"] in FINISHED and status.get("reason"), (handle.name, name, status)
            if status["phase"] == "Failed":
                assert status.get("message"), (handle.name, name, status)
            assert condition(am, "Reconciling").get("status") == "False", (handle.name, name, status)
            # Exactly one Job per run, ever, owned by its run.
            uids = jobs.uids.get((handle.namespace, name), set())
            if status.get("targetVersion"):
                assert len(uids) == 1, (handle.name, name, uids)
                job = get(kube, "job", name, "-n", handle.namespace)
                assert job["metadata"]["ownerReferences"][0]["uid"] == am["metadata"]["uid"]
        extra = {key for key in jobs.uids if key[0] == handle.namespace} - {(handle.namespace, n) for n in runs}
        assert not extra, f"Jobs that belong to no run: {extra}"
        status = final[handle.name]["status"]
        assert_versions_sound(status, runs, handle.name)
        current = status.get("currentCheckpoint")
        if current:
            assert_checkpoint_sound(s3, handle.ns_uid, current)
    print(f"outcomes: {dict(outcomes)}; held: {held}")
    # The cut upload: the store had half its body when it died; that run ended like every other.
    assert 0 < cut.forwarded == cut.body_bytes // 2, (cut.request_line, cut.forwarded, cut.body_bytes)
    cut_at = re.search(r"/learners/([^/]+)/checkpoints/v(\d+)/", cut.request_line)
    assert cut_at, cut.request_line
    (cut_handle,) = [h for h in handles if h.ns_uid == cut_at[1]]
    (cut_run,) = [am for am in found[cut_handle.namespace].values()
                  if am["status"].get("targetVersion") == int(cut_at[2])]
    print(f"cut {cut.request_line!r} after {cut.forwarded} of {cut.body_bytes} bytes: "
          f"{cut_run['metadata']['name']} ended {cut_run['status']['phase']}/{cut_run['status'].get('reason')}")
    # The held runs reported in the outage: none was accepted before the store was back to check it.
    for key in held:
        namespace, pod = key.split("/")
        name = pod.rsplit("-", 1)[0]  # the Job's pod: <job>-<suffix>
        status = found[namespace][name]["status"]
        assert status["phase"] in FINISHED, status
        if status["phase"] == "Succeeded":
            assert datetime.fromisoformat(status["completedAt"].replace("Z", "+00:00")) >= back_at, (key, status)
    # And the learners saw the outage (StoreAvailable=False), then recovered (all Ready, above).
    with statuses.lock:
        noticed = {name for (_, name), versions in statuses.seen.items()
                   if any(condition(o, "StoreAvailable").get("status") == "False" for o in versions)}
    assert noticed, "no learner ever showed the store unavailable"

    # A failed run leaves no unfinished upload behind (the operator aborts them), and whatever it
    # wrote is never current (below); what it left is printed.
    client = s3.client()
    shards = [o["Key"].rsplit("/", 1)[1] for o in client.list_objects_v2(
        Bucket=s3.bucket, Prefix=layout.base_prefix(seed.BASE_MODEL, 1) + "/")["Contents"]]
    left: dict[str, list[str]] = {}
    for handle in handles:
        for name, am in found[handle.namespace].items():
            version = am["status"].get("targetVersion")
            if am["status"]["phase"] != "Failed" or not version:
                continue
            prefix = layout.checkpoint_prefix(handle.ns_uid, version)
            left[f"{handle.name}/{name}/v{version}"] = sorted(
                o["Key"].rsplit("/", 1)[1] for o in client.list_objects_v2(
                    Bucket=s3.bucket, Prefix=prefix + "/").get("Contents", []))
            checkpoint = S3Store(client, s3.bucket, prefix)
            wait_for(lambda checkpoint=checkpoint: not checkpoint.incomplete_uploads(names=shards), 30,
                     f"the operator to abort {handle.name}/{name}'s unfinished uploads")
    print(f"what the failed runs left in the store: {left}")

    ever = checkpoints_ever_current(statuses)
    succeeded = {(h.name, am["status"]["targetVersion"]) for h in handles
                 for am in found[h.namespace].values() if am["status"]["phase"] == "Succeeded"}
    by_name = {h.name: h for h in handles}
    for name, checkpoints in ever.items():
        versions = [c["version"] for c in checkpoints]
        assert versions == sorted(set(versions)), f"{name}: current went {versions}: never back"
        for checkpoint in checkpoints:
            assert (name, checkpoint["version"]) in succeeded, f"{name}: v{checkpoint['version']} was current " \
                                                               f"but its run did not succeed"
            assert_checkpoint_sound(s3, by_name[name].ns_uid, checkpoint)
    assert outcomes.get("Succeeded/Verified", 0) >= 1, "the storm must still produce merges after the outage"


# ---- 3. the operator SIGKILLed, again and again, during a rollout with merges in flight -------------
def test_operator_sigkilled_repeatedly_during_a_rollout_with_merges_converges_without_duplicates(
        kube: Kube, s3: S3Info, cluster: LocalCluster, chaos_operator: OperatorProcess, uid: str,
        request: pytest.FixtureRequest) -> None:
    """The issue asks for 20 SIGKILLs during a 200-learner rollout, with merges in flight. Here:
    the issue's 20 SIGKILLs, during a rollout of 60 learners (by default), 8 of them asking for 3 real
    merges each (24 runs, at most LIMIT=3 at once). Measured on this machine's two cores (shared by
    the control plane, MinIO, the operator, the merge pods and this test): with 200 learners it
    passed, the test itself taking about 2 minutes (the kills span about 100 s), but deleting the
    200 learners afterwards (guardian approval, namespaces) took 2 minutes more, about 4.5 in all;
    with 120 learners, 1:45 plus 1 minute of cleanup. The suite runs 60 (PRIVATEFM_CHAOS_LEARNERS;
    set 200 for the issue's size), to keep the whole suite within CI's time.

    The rollout comes in 20 waves of 7-8 learners, one wave before each kill; each kill comes at a
    random point (0.2-4 s) after the operator answered ready, and the operator is started again
    after a random pause (0-1 s; seeded, the seed is printed). Then: every learner is Ready; each
    merging learner's namespace holds exactly its three runs and exactly one Job for each (a watch
    records every Job and AdapterMerge that ever existed, by uid), its versions are 1, 2 and 3, one
    per run, and its current checkpoint verifies; the other learners have no run, no Job and no
    version; no learner's current checkpoint ever went back or pointed at an unverified version;
    and several kills came while runs were unfinished."""
    count = int(os.environ.get("PRIVATEFM_CHAOS_LEARNERS", "60"))  # 200: the size
    merging, kills, runs_each = 8, 20, 3
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    print(f"chaos seed {seed}")
    bodies = fleet_bodies("ck", uid, count)
    names = [b["metadata"]["name"] for b in bodies]
    request.addfinalizer(lambda: delete_fleet(kube, names, timeout=180))
    # The merging learners exist first (their adapters need their nsUid); the rest roll out under fire.
    apply_fleet(kube, bodies[:merging])
    handles = [handle_of(kube, s3, obj) for obj in wait_all_ready(kube, names[:merging], timeout=120).values()]
    for handle in handles:
        handle.publish_adapter(1)
    namespaces = {h.namespace for h in handles}
    rest = bodies[merging:]
    waves = [rest[i::kills] for i in range(kills)]

    began = time.monotonic()
    with Recorder(kube, "learnernamespaces", keep=lambda o: o["metadata"]["name"] in names) as statuses, \
            Recorder(kube, "jobs", keep=lambda o: o["metadata"]["namespace"] in namespaces) as jobs, \
            Recorder(kube, "adaptermerges") as merges:
        for n in range(1, runs_each + 1):
            for handle in handles:
                handle.request_merge(f"m{n}")
        in_flight = []  # unfinished runs at each kill
        for i in range(kills):
            apply_fleet(kube, waves[i])
            time.sleep(rng.uniform(0.2, 4.0))
            in_flight.append(merges.unfinished(namespaces))
            chaos_operator.kill()
            time.sleep(rng.uniform(0.0, 1.0))
            chaos_operator.start(timeout=120)
        killed_at = time.monotonic() - began
        final = wait_all_ready(kube, names, timeout=240)
        found = wait_merges_finished(kube, namespaces, runs_each * merging, timeout=240)
        time.sleep(2)  # the last status writes reach the watch
    took = time.monotonic() - began
    ready_at = {name: obj["status"] for name, obj in final.items()}
    print(f"{kills} SIGKILLs over {killed_at:.0f}s (unfinished runs at each: {in_flight}); {count} learners "
          f"Ready and {runs_each * merging} runs finished {took:.0f}s after the merges were asked for")
    assert sum(1 for n in in_flight if n) >= 3, f"merges were in flight at too few kills: {in_flight}"

    # No duplicates: one Job per run, ever; no AdapterMerge the test did not ask for, in any learner.
    expected_runs = {f"m{n}" for n in range(1, runs_each + 1)}
    all_namespaces = {status["namespace"] for status in ready_at.values()}
    with merges.lock:
        ams_ever = {key: set(uids) for key, uids in merges.uids.items() if key[0] in all_namespaces}
    for handle in handles:
        runs = found[handle.namespace]
        assert set(runs) == expected_runs, (handle.name, sorted(runs))
        for name, am in runs.items():
            assert am["status"]["phase"] == "Succeeded", (handle.name, name, am["status"])
            assert ams_ever[(handle.namespace, name)] == {am["metadata"]["uid"]}
            uids = jobs.uids.get((handle.namespace, name), set())
            assert len(uids) == 1, f"{handle.name}/{name}: Jobs ever made: {uids}"
            job = get(kube, "job", name, "-n", handle.namespace)
            assert job["metadata"]["uid"] in uids
            assert job["metadata"]["ownerReferences"][0]["uid"] == am["metadata"]["uid"]
        extra_jobs = {key for key in jobs.uids if key[0] == handle.namespace} - \
            {(handle.namespace, n) for n in expected_runs}
        assert not extra_jobs, f"{handle.name}: Jobs that belong to no run: {extra_jobs}"
        status = ready_at[handle.name]
        assert_versions_sound(status, runs, handle.name)
        assert status["lastAssignedVersion"] == runs_each
        assert_checkpoint_sound(s3, handle.ns_uid, status["currentCheckpoint"])
    stray = {key for key in ams_ever if key[0] not in namespaces}
    assert not stray, f"AdapterMerges in learners that never asked for one: {sorted(stray)[:5]}"
    for name in names[merging:]:
        status = ready_at[name]
        assert not status.get("currentCheckpoint") and not status.get("lastAssignedVersion"), (name, status)
    jobs_elsewhere = [j["metadata"]["namespace"] for j in get(kube, "jobs", "-A", "-l", MERGE_JOBS).get("items", [])
                      if j["metadata"]["namespace"] in all_namespaces - namespaces]
    assert not jobs_elsewhere, jobs_elsewhere

    # Every learner converged to one namespace of its own, with nothing stuck.
    assert len(all_namespaces) == count
    for name, obj in final.items():
        assert obj["status"]["phase"] == "Ready", (name, obj["status"])
        assert condition(obj, "Stalled").get("status") == "False", (name, condition(obj, "Stalled"))
    by_name = {h.name: h for h in handles}
    for name, checkpoints in checkpoints_ever_current(statuses).items():
        versions = [c["version"] for c in checkpoints]
        assert versions == sorted(set(versions)), f"{name}: current went {versions}: never back"
        assert name in by_name, f"{name} never merged, yet showed a current checkpoint {checkpoints}"
        for checkpoint in checkpoints:
            assert_checkpoint_sound(s3, by_name[name].ns_uid, checkpoint)
