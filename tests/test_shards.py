"""Sharding on the real control plane: operator processes under the shipped RBAC and admission
policies, each holding its shard's Lease in privatefm-system (``privatefm_operator.sharding``,
``privatefm_operator.leases``).

The session's operator is stopped for this module (it would act on every learner) and started
again afterwards. Which process handled a learner is read off its log: every pass that ends logs a
line naming the learner (``privatefm_operator.controller``).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from privatefm_operator import naming
from privatefm_operator.sharding import KOPF_FINALIZER, shard_of
from privatefm_testing.cluster import S3Info
from privatefm_testing.kube import Kube, wait_for
from privatefm_testing.operator_proc import OperatorProcess
from test_fleet import make_learner
from test_operator import GUARDIAN, LearnerHandle, get

pytestmark = pytest.mark.cluster
REPO = Path(__file__).resolve().parents[1]
SYSTEM = "privatefm-system"
LEASES = "app.kubernetes.io/managed-by=privatefm-operator,app.kubernetes.io/component=shard-lease"
# Short Leases, so that a takeover takes seconds: retry < renew deadline < duration, as shipped.
LEASE = {"lease_namespace": SYSTEM, "lease_duration_seconds": "4", "lease_renew_deadline_seconds": "3",
         "lease_retry_seconds": "1"}


def ids_of_shard(shard: int, count: int, uid: str, shards: int = 2) -> list[str]:
    """``count`` learnerIds that hash to ``shard`` of ``shards``."""
    found = (f"s{n}{uid}" for n in range(1000))
    return [i for i in found if shard_of(i, shards) == shard][:count]


class Processes:
    """Operator processes started by this module; all stopped at the end."""

    def __init__(self, operator: OperatorProcess, tmp: Path) -> None:
        self.base = {k: v for k, v in operator.env.items() if k.startswith("PRIVATEFM_")}
        self.kubeconfig, self.tmp = Path(operator.env["KUBECONFIG"]), tmp
        self.started: list[OperatorProcess] = []

    def start(self, s3: S3Info, name: str, **settings: str) -> OperatorProcess:
        proc = OperatorProcess(self.kubeconfig, s3, self.tmp / f"{name}.log")
        proc.env.update({k: v for k, v in self.base.items() if k not in ("PRIVATEFM_HTTP_PORT",
                                                                          "PRIVATEFM_LIVENESS_PORT")})
        proc.env.update({f"PRIVATEFM_{k.upper()}": v for k, v in settings.items()})
        proc.start()
        self.started.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.started:
            proc.stop()


@pytest.fixture
def processes(operator: OperatorProcess, kube: Kube, tmp_path: Path) -> Iterator[Processes]:
    operator.stop()
    procs = Processes(operator, tmp_path)
    try:
        yield procs
    finally:
        procs.stop()
        for proc in procs.started:
            print(f"---- {proc.log_path.name}\n{proc.log_tail(25)}")
        kube.kubectl("-n", SYSTEM, "delete", "lease", "-l", LEASES, check=False)
        operator.start()


def held(proc: OperatorProcess, shard: int) -> float | None:
    with contextlib.suppress(OSError):
        return proc.metrics().get(f'privatefm_shard_held{{shard="{shard}"}}')
    return None


def handled(proc: OperatorProcess, name: str) -> bool:
    """The process reconciled the learner (its log has a pass for it)."""
    for line in proc.log_path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("msg") == "learner reconciled" and entry.get("learner") == name:
                return True
    return False


def finalizers(kube: Kube, name: str) -> list[str]:
    return list(get(kube, "lns", name).get("metadata", {}).get("finalizers") or [])


def lease(kube: Kube, shard: int) -> dict[str, object]:
    return get(kube, "lease", f"privatefm-operator-shard-{shard}", "-n", SYSTEM)


def apply_learner(kube: Kube, name: str, learner_id: str) -> None:
    """A learner, without waiting for it (make_learner waits for Ready)."""
    body = yaml.safe_load((REPO / "manifests" / "samples" / "learnernamespace-minimal.yaml").read_text())
    body["metadata"]["name"] = name
    body["spec"].update(learnerId=learner_id, deletionDelay="2s")
    kube.kubectl("apply", "-f", "-", input=json.dumps(body))


def test_two_shards_split_the_learners_and_only_a_shards_standby_takes_it_over(
        kube: Kube, s3: S3Info, processes: Processes, uid: str) -> None:
    """Shard 0 has a holder and a standby, shard 1 a holder. Each learner is handled by its own
    shard only (the logs say which). SIGKILL shard 0's holder: shard 1 never takes its
    learners; the standby takes the Lease once it is not renewed for its duration, and a learner of
    shard 0 created meanwhile becomes Ready through it. Kill that one too: a shard-0 learner stays
    untouched while shard 1 runs. Only when the shard count changes (shard 1's process restarted
    with one shard) does it take them, after the dead holder's Lease of the old count expired; the
    finalizers kopf left on learners in earlier versions are dropped then too."""
    a = processes.start(s3, "shard0-a", shards="2", shard_index="0", **LEASE)
    wait_for(lambda: held(a, 0) == 1, 30, "shard 0's holder to hold its Lease")
    standby = processes.start(s3, "shard0-b", shards="2", shard_index="0", **LEASE)
    b = processes.start(s3, "shard1", shards="2", shard_index="1", **LEASE)
    wait_for(lambda: held(b, 1) == 1, 30, "shard 1's holder to hold its Lease")
    assert held(standby, 0) == 0
    first_holder = lease(kube, 0)["spec"]["holderIdentity"]  # type: ignore[index]

    handles: list[LearnerHandle] = []
    names: list[str] = []
    try:
        for shard in (0, 1):
            for learner_id in ids_of_shard(shard, 2, uid):
                handles.append(make_learner(kube, s3, f"sh-{learner_id}", learner_id))
        for handle in handles:
            mine, other = (a, b) if shard_of(handle.learner_id, 2) == 0 else (b, a)
            assert handled(mine, handle.name) and not handled(other, handle.name), handle.name
            assert finalizers(kube, handle.name) == [naming.GUARDIAN_FINALIZER]  # no other: kopf's are gone

        # Shard 0's holder dies. Its standby takes over; shard 1 never does.
        a.kill()
        killed = time.monotonic()
        (late0,), (late1,) = ids_of_shard(0, 3, uid)[2:], ids_of_shard(1, 3, uid)[2:]
        names += [f"sh-{late0}", f"sh-{late1}"]
        apply_learner(kube, f"sh-{late1}", late1)
        apply_learner(kube, f"sh-{late0}", late0)
        kube.kubectl("wait", "--for=condition=Ready", f"lns/sh-{late1}", "--timeout=60s")
        kube.kubectl("wait", "--for=condition=Ready", f"lns/sh-{late0}", "--timeout=60s")
        assert time.monotonic() - killed >= 3.5  # not before the dead holder's Lease ran out
        assert held(standby, 0) == 1
        taken = lease(kube, 0)["spec"]
        assert taken["holderIdentity"] != first_holder and taken["leaseTransitions"] >= 1  # type: ignore[index]
        assert handled(standby, f"sh-{late0}") and not handled(b, f"sh-{late0}")
        assert handled(b, f"sh-{late1}") and not handled(standby, f"sh-{late1}")

        # No holder left for shard 0: shard 1 leaves its learners alone.
        standby.kill()
        (orphan,) = ids_of_shard(0, 4, uid)[3:]
        names.append(f"sh-{orphan}")
        apply_learner(kube, f"sh-{orphan}", orphan)
        time.sleep(8)
        untouched = get(kube, "lns", f"sh-{orphan}").get("status") or {}
        assert untouched == {"observedGeneration": 0}, untouched  # the schema's default alone
        assert finalizers(kube, f"sh-{orphan}") == [] and not handled(b, f"sh-{orphan}")

        # The shard count changes to 1: shard 1's process restarts as the only shard and takes all,
        # once no live Lease of the old count is left. Two learners carry the finalizers kopf wrote
        # in earlier versions (one per shard): the first pass drops them.
        b.stop()
        legacy = [KOPF_FINALIZER, f"{KOPF_FINALIZER}-0", f"{KOPF_FINALIZER}-1"]
        for handle in handles[:1] + handles[-1:]:
            kube.kubectl("patch", "lns", handle.name, "--type=merge", "-p",
                         json.dumps({"metadata": {"finalizers": [*finalizers(kube, handle.name), *legacy]}}))
        one = processes.start(s3, "one-shard", shards="1", shard_index="0", **LEASE)
        kube.kubectl("wait", "--for=condition=Ready", f"lns/sh-{orphan}", "--timeout=60s")
        assert held(one, 0) == 1
        # It waited for the killed standby's Lease of the old count to run out before acting.
        assert "with 2 shards, and this process runs with 1" in one.log_path.read_text()
        assert lease(kube, 0)["metadata"]["annotations"]["privatefm.io/shards"] == "1"  # type: ignore[index]
        for name in [h.name for h in handles] + names:
            wait_for(lambda n=name: finalizers(kube, n) == [naming.GUARDIAN_FINALIZER], 30,
                     f"{name} to carry only the guardian finalizer")
            assert handled(one, name)
    finally:
        for name in [h.name for h in handles] + names:
            kube.kubectl("delete", "lns", name, "--wait=false", check=False)
            kube.kubectl("annotate", "--overwrite", "lns", name, f"privatefm.io/deletion-approved-by={GUARDIAN}",
                         f"--as={GUARDIAN}", "--as-group=system:authenticated", check=False)
