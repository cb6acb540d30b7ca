"""The privatefm.io API as the real API server enforces it: generated CRDs, samples, rejections."""

from __future__ import annotations

import copy
import json
import re
import zoneinfo
from pathlib import Path
from typing import Any

import pytest
import yaml
from privatefm_operator import crdgen
from privatefm_operator.api import IANA_TIME_ZONE, AdapterMerge, LearnerNamespace
from privatefm_testing.kube import Kube

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "manifests" / "samples"


def load(name: str) -> dict[str, Any]:
    return dict(yaml.safe_load((SAMPLES / name).read_text()))


def lns(name: str, **spec: Any) -> dict[str, Any]:
    body = load("learnernamespace-minimal.yaml")
    body["metadata"] = {"name": name}
    body["spec"].update(spec)
    return body


def with_path(body: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of ``body`` with the dotted ``path`` set (``...=DELETE`` removes it)."""
    body = copy.deepcopy(body)
    *parents, leaf = path.split(".")
    node = body
    for key in parents:
        node = node.setdefault(key, {})
    if value is DELETE:
        node.pop(leaf, None)
    else:
        node[leaf] = value
    return body


DELETE = object()
GOOD = lns("placeholder")


def merge(**settings: Any) -> dict[str, Any]:
    """``GOOD`` with these ``spec.merge`` settings."""
    return with_path(GOOD, "spec.merge", settings)


def requests(**quantities: Any) -> dict[str, Any]:
    return merge(resources={"requests": quantities})


# (id, object, field the error must name, further text the error must contain)
MALFORMED: list[tuple[str, dict[str, Any], str, str]] = [
    ("learnerId-uppercase", with_path(GOOD, "spec.learnerId", "Ada"), "spec.learnerId", "should match"),
    ("learnerId-too-long", with_path(GOOD, "spec.learnerId", "a" * 41), "spec.learnerId", "40"),
    ("learnerId-missing", with_path(GOOD, "spec.learnerId", DELETE), "spec.learnerId", "Required"),
    ("learnerId-int", with_path(GOOD, "spec.learnerId", 5), "spec.learnerId", "string"),
    ("subjects-duplicate", with_path(GOOD, "spec.subjects", ["math", "math"]), "spec.subjects[1]", "Duplicate"),
    ("subjects-bad-item", with_path(GOOD, "spec.subjects", ["Math!"]), "spec.subjects[0]", "should match"),
    ("subjects-not-list", with_path(GOOD, "spec.subjects", "math"), "spec.subjects", "array"),
    ("baseModel-missing", with_path(GOOD, "spec.baseModel", DELETE), "spec.baseModel", "Required"),
    ("baseModel-name-pattern", with_path(GOOD, "spec.baseModel.name", "Tiny_Llama"), "spec.baseModel.name",
     "should match"),
    ("baseModel-version-zero", with_path(GOOD, "spec.baseModel.version", 0), "spec.baseModel.version", "1"),
    ("baseModel-version-type", with_path(GOOD, "spec.baseModel.version", "one"), "spec.baseModel.version",
     "integer"),
    ("guardians-empty", with_path(GOOD, "spec.guardians", []), "spec.guardians", "at least 1"),
    ("guardians-missing", with_path(GOOD, "spec.guardians", DELETE), "spec.guardians", "Required"),
    ("guardian-kind", with_path(GOOD, "spec.guardians", [{"kind": "Parent", "name": "x"}]),
     "spec.guardians[0].kind", "Unsupported value"),
    ("guardian-duplicate", with_path(GOOD, "spec.guardians", [{"kind": "User", "name": "x"}] * 2),
     "spec.guardians[1]", "Duplicate"),
    ("deletionDelay-not-go", with_path(GOOD, "spec.deletionDelay", "1 day"), "spec.deletionDelay", "should match"),
    ("deletionDelay-too-long", with_path(GOOD, "spec.deletionDelay", "9000h"), "spec.deletionDelay", "8760h"),
    ("schedule-4-fields", with_path(GOOD, "spec.merge", {"schedule": "0 2 * *"}), "spec.merge.schedule",
     "should match"),
    ("schedule-6-fields", with_path(GOOD, "spec.merge", {"schedule": "0 0 2 * * *"}), "spec.merge.schedule",
     "should match"),
    ("schedule-macro", with_path(GOOD, "spec.merge", {"schedule": "@daily"}), "spec.merge.schedule",
     "should match"),
    ("timeZone", with_path(GOOD, "spec.merge", {"timeZone": "Berlin time"}), "spec.merge.timeZone",
     "should match"),
    ("gpus-too-many", with_path(GOOD, "spec.merge", {"gpus": 9}), "spec.merge.gpus", "less than or equal to 8"),
    ("gpus-negative", with_path(GOOD, "spec.merge", {"gpus": -1}), "spec.merge.gpus", "greater than or equal"),
    # Each cron field within CronJob's ranges (robfig/cron: day of week is 0-6, 7 is rejected there too).
    ("schedule-minute-61", merge(schedule="61 * * * *"), "spec.merge.schedule", "minute field (#1)"),
    ("schedule-hour-25", merge(schedule="0 25 * * *"), "spec.merge.schedule", "hour field (#2)"),
    ("schedule-letters", merge(schedule="a b c d e"), "spec.merge.schedule", "minute field (#1)"),
    ("schedule-dom-0", merge(schedule="0 2 0 * *"), "spec.merge.schedule", "day-of-month field (#3)"),
    ("schedule-month-13", merge(schedule="0 2 * 13 *"), "spec.merge.schedule", "month field (#4)"),
    ("schedule-dow-7", merge(schedule="0 2 * * 7"), "spec.merge.schedule", "day-of-week field (#5)"),
    ("schedule-range-reversed", merge(schedule="0 2 * * FRI-MON"), "spec.merge.schedule", "a <= b"),
    ("schedule-step-0", merge(schedule="*/0 * * * *"), "spec.merge.schedule", "n >= 1"),
    ("schedule-H-in-day-of-month", merge(schedule="0 2 H * *"), "spec.merge.schedule", "day-of-month field (#3)"),
    ("schedule-H-range-reversed", merge(schedule="H(40-10) 2 * * *"), "spec.merge.schedule", "a <= b"),
    ("schedule-H-range-beyond", merge(schedule="0 H(20-24) * * *"), "spec.merge.schedule", "hour field (#2)"),
    ("schedule-H-step-0", merge(schedule="H/0 2 * * *"), "spec.merge.schedule", "minute field (#1)"),
    ("schedule-H-lowercase", merge(schedule="h 2 * * *"), "spec.merge.schedule", "minute field (#1)"),
    ("timeZone-Local", merge(timeZone="Local"), "spec.merge.timeZone", "not Local"),
    ("timeZone-component-over-14", merge(timeZone="Europe/Berlin_and_Brandenburg"), "spec.merge.timeZone",
     "should match"),
    # Quantities: parsed as Kubernetes parses them (its regex alone let 1.2.3 through to a 500 on apply).
    ("quantity-negative", requests(cpu="-1"), "spec.merge.resources.requests[cpu]", "must not be negative"),
    ("quantity-negative-int", requests(cpu=-1), "spec.merge.resources.requests[cpu]", "must not be negative"),
    ("quantity-1.2.3", requests(cpu="1.2.3"), "spec.merge.resources.requests[cpu]", "must be a quantity"),
    ("quantity-1KKK", merge(resources={"limits": {"memory": "1KKK"}}), "spec.merge.resources.limits[memory]",
     "must be a quantity"),
    ("quantity-word", requests(cpu="lots"), "spec.merge.resources.requests[cpu]", "must be a quantity"),
    ("quantity-float", requests(cpu=1.5), "spec.merge.resources.requests.cpu", "integer,string"),
    ("gpu-in-limits", merge(resources={"limits": {"nvidia.com/gpu": 1}}), "spec.merge.resources.limits",
     "merge.gpus"),
    ("gpu-in-requests", requests(**{"nvidia.com/gpu": 2}), "spec.merge.resources.requests", "merge.gpus"),
    ("resource-name-unknown", requests(memroy="1Gi"), "spec.merge.resources.requests",
     "may name only cpu, memory, ephemeral-storage"),
    ("nodeSelector-key", merge(nodeSelector={"bad key!": "x"}), "spec.merge.nodeSelector", "label keys"),
    ("nodeSelector-key-prefix-over-253", merge(nodeSelector={"a" * 254 + "/b": "x"}), "spec.merge.nodeSelector",
     "label keys"),
    ("nodeSelector-value", merge(nodeSelector={"disk": "fast ssd"}), "spec.merge.nodeSelector.disk",
     "should match"),
    ("toleration-operator", merge(tolerations=[{"operator": "Maybe"}]),
     "spec.merge.tolerations[0].operator", "Unsupported value"),
    ("toleration-exists-with-value", merge(tolerations=[{"key": "k", "operator": "Exists", "value": "v"}]),
     "spec.merge.tolerations[0].value", "value must be empty when operator is Exists"),
    ("toleration-no-key-equal", merge(tolerations=[{"value": "v"}]), "spec.merge.tolerations[0].operator",
     "operator must be Exists when key is empty"),
    ("toleration-seconds-without-NoExecute", merge(tolerations=[{"key": "k", "operator": "Exists",
                                                                 "tolerationSeconds": 30}]),
     "spec.merge.tolerations[0].effect", "NoExecute"),
    ("toleration-key", merge(tolerations=[{"key": "bad key!", "operator": "Exists"}]),
     "spec.merge.tolerations[0].key", "label key"),
    ("toleration-value", merge(tolerations=[{"key": "k", "value": "bad value!"}]),
     "spec.merge.tolerations[0].value", "should match"),
    ("unknown-spec-field", with_path(GOOD, "spec.fooBar", 1), "spec.fooBar", "unknown field"),
    ("unknown-merge-field", with_path(GOOD, "spec.merge", {"cron": "0 2 * * *"}), "spec.merge.cron",
     "unknown field"),
    ("name-too-long", with_path(GOOD, "metadata.name", "l" * 64), "metadata.name: Invalid value", "at most 63"),
]

# Valid variants the rules above must keep accepting: (id, object).
ACCEPTED: list[tuple[str, dict[str, Any]]] = [
    ("schedule-lists-ranges-steps-names", merge(schedule="*/15 2-4 1,15 JAN-MAR MON-FRI")),
    ("schedule-question-marks", merge(schedule="0 2 ? * ?")),
    ("schedule-lowercase-names-steps", merge(schedule="0 2 * jan-dec/3 sun-sat/2")),
    ("schedule-leading-zeros-tab", merge(schedule="00 02\t*/1 * 0-6")),
    ("schedule-start-with-step", merge(schedule="5/20 1-23/2 1/7 2-dec 0-SAT")),
    ("schedule-hashed", merge(schedule="H H(1-4) * * MON-FRI")),
    ("schedule-hashed-steps-lists", merge(schedule="H(0-29)/10,45 H/6 * * *")),
    ("timeZone-three-parts", merge(timeZone="America/Argentina/Buenos_Aires")),
    ("timeZone-etc-offset", merge(timeZone="Etc/GMT+5")),
    # Well-formed but unknown: only the zone database knows, so the operator reports it, not the schema.
    ("timeZone-unknown", merge(timeZone="Mars/Olympus")),
    ("quantities", merge(resources={"requests": {"cpu": "500m", "memory": "1.5Gi", "ephemeral-storage": 2},
                                    "limits": {"cpu": "2e0", "memory": "2Gi", "ephemeral-storage": "10G"}})),
    ("quantity-zero", requests(cpu=0, memory="0")),
    ("tolerate-every-taint", merge(tolerations=[{"operator": "Exists"}, {"key": "", "operator": "Exists"}])),
    ("tolerations", merge(tolerations=[
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute",
         "tolerationSeconds": 300},
        {"key": "dedicated", "value": "merge_v1.2", "effect": "PreferNoSchedule"},
        {"key": "dedicated", "operator": "Equal", "value": ""}])),
    ("nodeSelector", merge(nodeSelector={"kubernetes.io/arch": "amd64", "nvidia.com/gpu.present": "true",
                                         "Pool_1.a": "", "a" * 253 + "/" + "b" * 63: "c" * 63})),
]

# Schedules against CronJob's own validation in the same API server: each must get the same verdict.
SCHEDULES_AS_CRONJOB = [
    "0 2 * * *", "*/15 2-4 1,15 JAN-MAR MON-FRI", "0 2 * * 6", "0 2 * * 0", "? * * * *", "0 2 ? * ?",
    "05 02 * * *", "000 2 * * 006", "0 2 * jan mon", "0 2 * Jan-mar sun", "0 2 * 2-dec *", "0 2 * * 0-sat",
    "1/5 * * * *", "0-59/100 * * * *", "*/60 * * * *", "0 0-23/2 * * *", "0 2 31 2 *", "0 2 15-15 * *",
    "0 2 * * mon/2", "0 2 * * 0-SAT/3", "0 2 1-31/2 * *",
    "0 2 * * 7", "0 2 * * 1-7", "0 2 * * 07", "61 * * * *", "60 * * * *", "0 25 * * *", "0 24 * * *",
    "0 2 0 * *", "0 2 32 * *", "0 2 * 0 *", "0 2 * 13 *", "a b c d e", "jan * * * *", "0 2 * * MONDAY",
    "5-3 * * * *", "59-0 * * * *", "0 2 * DEC-JAN *", "0 2 * * SAT-SUN", "0 2 * 12-1 *", "*/0 * * * *",
    "0/0 * * * *", "5/ * * * *", "*/ * * * *", "1-2-3 * * * *", "1/2/3 * * * *", "0 2 * * -1",
]
# Where the schema is deliberately stricter than CronJob's lax parser.
SCHEDULES_STRICTER = ["1,,2 * * * *", ",1 * * * *", "+5 * * * *", "*-5 * * * *"]

AM_GOOD: dict[str, Any] = {"apiVersion": "privatefm.io/v1alpha1", "kind": "AdapterMerge",
                           "metadata": {"name": "placeholder"}, "spec": {"trigger": "Manual"}}
MALFORMED_AM: list[tuple[str, dict[str, Any], str, str]] = [
    ("am-trigger", with_path(AM_GOOD, "spec.trigger", "Nightly"), "spec.trigger", "Unsupported value"),
    ("am-adapterSeq", with_path(AM_GOOD, "spec.adapterSeq", -1), "spec.adapterSeq", "greater than or equal"),
    ("am-baseVersion-type", with_path(AM_GOOD, "spec.baseVersion", "latest"), "spec.baseVersion", "integer"),
    ("am-name-dots", with_path(AM_GOOD, "metadata.name", "merge.one"), "metadata.name: Invalid value",
     "DNS label"),
    ("am-name-too-long", with_path(AM_GOOD, "metadata.name", "m" * 64), "metadata.name: Invalid value",
     "at most 63"),
    ("am-spec-missing", with_path(AM_GOOD, "spec", DELETE), "spec", "Required value"),
    ("am-unknown", with_path(AM_GOOD, "spec.priority", "high"), "spec.priority", "unknown field"),
]


@pytest.fixture(scope="session")
def crds(kube: Kube) -> None:
    kube.kubectl("apply", "-k", str(REPO / "crds"))
    kube.wait_established("learnernamespaces.privatefm.io", "adaptermerges.privatefm.io")


# ---- no server needed ------------------------------------------------------------------------
def test_committed_crds_equal_generated() -> None:
    for directory in crdgen.CRD_DIRS:
        for name, text in crdgen.files().items():
            assert (directory / name).read_text() == text, f"{directory}/{name} is stale: run privatefm-crdgen"


def test_generated_schema_is_structural_and_default_free() -> None:
    """No defaults, but one: status defaults to observedGeneration 0, so an object the operator has not
    looked at reads as in progress to kstatus and Argo CD (docs/gitops.md)."""
    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            assert "$ref" not in node and "anyOf" not in node and "title" not in node, path
            if path.endswith(".status") and path.count(".") == 1:
                assert node.get("default") == {"observedGeneration": 0}, path
                node = {k: v for k, v in node.items() if k != "default"}  # the rest of status has none
            assert "default" not in node, f"{path}: defaults make the API server rewrite objects"
            if "properties" in node:
                for key, prop in node["properties"].items():
                    assert key == "metadata" or prop.get("description"), f"{path}.{key} has no description"
                    walk(prop, f"{path}.{key}")
            for key in ("items", "additionalProperties"):
                if isinstance(node.get(key), dict):
                    walk(node[key], f"{path}[]")

    for info in crdgen.CRDS:
        walk(crdgen.openapi_schema(info), info.kind)


def test_every_known_time_zone_passes_the_schema() -> None:
    pattern = re.compile(IANA_TIME_ZONE)
    zones = zoneinfo.available_timezones()
    assert "Europe/Berlin" in zones
    assert [z for z in zones if not pattern.match(z) or z.lower() == "local"] == []


def test_samples_parse_with_operator_defaults() -> None:
    ada = LearnerNamespace.model_validate(load("learnernamespace.yaml"))
    assert ada.spec.merge_settings().time_zone == "Europe/Berlin"
    bo = LearnerNamespace.model_validate(load("learnernamespace-minimal.yaml"))
    assert bo.spec.merge_settings().schedule is None  # the cluster's window decides (schedules.py)
    assert bo.spec.deletion_delay == "24h"
    assert AdapterMerge.model_validate(load("adaptermerge.yaml")).spec.trigger == "Manual"


# ---- against the real API server ---------------------------------------------------------------
@pytest.mark.cluster
def test_every_sample_is_accepted(kube: Kube, crds: None, namespace: str) -> None:
    for path in sorted(SAMPLES.glob("*.yaml")):
        body = yaml.safe_load(path.read_text())
        if body["kind"] == "AdapterMerge":
            body["metadata"]["namespace"] = namespace
        proc = kube.kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(body), check=False)
        assert proc.returncode == 0, f"{path.name}: {proc.stderr}"


@pytest.mark.cluster
@pytest.mark.parametrize(("case", "body", "field", "text"), MALFORMED + MALFORMED_AM,
                         ids=[c[0] for c in MALFORMED + MALFORMED_AM])
def test_malformed_manifest_is_rejected_naming_the_field(
        kube: Kube, crds: None, namespace: str, uid: str, case: str, body: dict[str, Any], field: str,
        text: str) -> None:
    body = copy.deepcopy(body)
    if body["metadata"]["name"] == "placeholder":
        body["metadata"]["name"] = f"{case}-{uid}"
    if body["kind"] == "AdapterMerge":
        body["metadata"]["namespace"] = namespace
    proc = kube.kubectl("apply", "-f", "-", input=json.dumps(body), check=False)
    assert proc.returncode != 0, f"{case} was accepted"
    assert field in proc.stderr, proc.stderr
    assert text in proc.stderr, proc.stderr


@pytest.mark.cluster
@pytest.mark.parametrize(("case", "body"), ACCEPTED, ids=[c[0] for c in ACCEPTED])
def test_valid_variant_is_accepted(kube: Kube, crds: None, uid: str, case: str, body: dict[str, Any]) -> None:
    body = with_path(body, "metadata.name", f"{case.lower()}-{uid}")
    proc = kube.kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(body), check=False)
    assert proc.returncode == 0, f"{case}: {proc.stderr}"


def _accepted(create: Any, body: dict[str, Any]) -> bool:
    """Whether a server-side dry-run create passes validation."""
    from kubernetes.client.exceptions import ApiException

    try:
        create(body)
    except ApiException as exc:
        assert exc.status == 422, exc.body  # rejected by validation, not by anything else
        return False
    return True


@pytest.mark.cluster
def test_schedule_verdicts_match_cronjob(kube: Kube, crds: None, namespace: str, uid: str) -> None:
    from kubernetes import client

    api = kube.api_client()
    custom, batch = client.CustomObjectsApi(api), client.BatchV1Api(api)

    def ours(schedule: str) -> bool:
        body = with_path(merge(schedule=schedule), "metadata.name", f"sched-{uid}")
        return _accepted(lambda b: custom.create_cluster_custom_object(
            "privatefm.io", "v1alpha1", "learnernamespaces", b, dry_run="All"), body)

    def cronjob(schedule: str) -> bool:
        body = {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "probe"},
                "spec": {"schedule": schedule, "jobTemplate": {"spec": {"template": {"spec": {
                    "restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox"}]}}}}}}
        return _accepted(lambda b: batch.create_namespaced_cron_job(namespace, b, dry_run="All"), body)

    verdicts = {s: (ours(s), cronjob(s)) for s in SCHEDULES_AS_CRONJOB + SCHEDULES_STRICTER}
    assert {s: v for s, v in verdicts.items() if s in SCHEDULES_AS_CRONJOB and v[0] != v[1]} == {}
    assert {s: v for s, v in verdicts.items() if s in SCHEDULES_STRICTER and v != (False, True)} == {}
    assert sum(ok for ok, _ in verdicts.values()) >= 20  # both kinds are really exercised


@pytest.mark.cluster
@pytest.mark.parametrize(("path", "value", "message"), [
    ("spec.learnerId", "someone-else", "learnerId is immutable"),
    ("spec.baseModel.name", "other-model", "baseModel.name is immutable"),
])
def test_immutable_learner_fields(kube: Kube, crds: None, uid: str, path: str, value: str, message: str) -> None:
    body = lns(f"imm-{uid}")
    kube.kubectl("apply", "-f", "-", input=json.dumps(body))
    try:
        proc = kube.kubectl("apply", "-f", "-", input=json.dumps(with_path(body, path, value)), check=False)
        assert proc.returncode != 0
        assert path in proc.stderr and message in proc.stderr, proc.stderr
        # A mutable field still updates.
        kube.kubectl("apply", "-f", "-", input=json.dumps(with_path(body, "spec.subjects", ["art"])))
    finally:
        kube.kubectl("delete", "lns", f"imm-{uid}", "--wait=false", check=False)


@pytest.mark.cluster
def test_adapter_merge_spec_is_immutable(kube: Kube, crds: None, namespace: str) -> None:
    body = with_path(AM_GOOD, "metadata", {"name": "once", "namespace": namespace})
    kube.kubectl("apply", "-f", "-", input=json.dumps(body))
    proc = kube.kubectl("apply", "-f", "-", input=json.dumps(with_path(body, "spec.adapterSeq", 3)), check=False)
    assert proc.returncode != 0 and "spec: Invalid value" in proc.stderr, proc.stderr
    assert "spec is immutable" in proc.stderr, proc.stderr

    def patch(op: dict[str, Any]) -> str:
        proc = kube.kubectl("patch", "am", "once", "-n", namespace, "--type=json", "-p", json.dumps([op]),
                            check=False)
        assert proc.returncode != 0, f"{op} was accepted"
        return proc.stderr

    # Removing spec (to add another afterwards) is no way around it: spec is required.
    assert "spec: Required value" in patch({"op": "remove", "path": "/spec"})
    replaced = patch({"op": "replace", "path": "/spec", "value": {"trigger": "Manual", "adapterSeq": 3}})
    assert "spec: Invalid value" in replaced and "spec is immutable" in replaced, replaced
    assert "spec is immutable" in patch({"op": "add", "path": "/spec/reason", "value": "again"})
    # The rest of the object still updates, and the spec is what it was.
    kube.kubectl("label", "am", "once", "-n", namespace, "note=kept")
    assert json.loads(kube.kubectl("get", "am", "once", "-n", namespace, "-o", "json").stdout)["spec"] == \
        AM_GOOD["spec"]


@pytest.mark.cluster
def test_kubectl_explain_shows_descriptions(kube: Kube, crds: None) -> None:
    out = kube.kubectl("explain", "lns.spec").stdout
    assert "Desired state" in out
    assert "learnerId" in out and "Stable id of the learner" in out
    assert "guardians" in out and "approve this learner's deletion" in out
    schedule = kube.kubectl("explain", "lns.spec.merge.schedule").stdout
    assert "Cron schedule with 5 fields" in schedule
    assert "Why the run exists" in kube.kubectl("explain", "am.spec.trigger").stdout


@pytest.mark.cluster
def test_kubectl_get_shows_printer_columns(kube: Kube, crds: None, namespace: str, uid: str) -> None:
    name = f"cols-{uid}"
    kube.kubectl("apply", "-f", "-", input=json.dumps(lns(name, learnerId=f"cols-{uid}")))
    status = {"status": {"phase": "Ready", "versionLag": 2, "currentCheckpoint": {
        "version": 7, "uri": "s3://b/learners/x/checkpoints/v7", "manifestSha256": "a" * 64, "baseVersion": 1}}}
    kube.kubectl("patch", "lns", name, "--subresource=status", "--type=merge", "-p", json.dumps(status))
    am = with_path(AM_GOOD, "metadata", {"name": f"run-{uid}", "namespace": namespace})
    kube.kubectl("apply", "-f", "-", input=json.dumps(am))
    try:
        lines = kube.kubectl("get", "lns", name).stdout.splitlines()
        assert lines[0].split() == ["NAME", "LEARNER", "PHASE", "CHECKPOINT", "LAG", "AGE"]
        assert lines[1].split()[:5] == [name, f"cols-{uid}", "Ready", "7", "2"]
        table = kube.kubectl("get", "am", "-A").stdout.splitlines()
        assert table[0].split() == ["NAMESPACE", "NAME", "TRIGGER", "PHASE", "VERSION", "REASON", "AGE"]
        assert any(line.split()[:3] == [namespace, f"run-{uid}", "Manual"] for line in table[1:])
        category = kube.kubectl("get", "privatefm", "-A").stdout  # both kinds, by category
        assert name in category and f"run-{uid}" in category
    finally:
        kube.kubectl("delete", "lns", name, "--wait=false", check=False)
