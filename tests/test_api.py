"""The privatefm.io API as the real API server enforces it: generated CRDs, samples, rejections."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from privatefm_operator import crdgen
from privatefm_operator.api import AdapterMerge, LearnerNamespace
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
    ("gpu-in-limits", with_path(GOOD, "spec.merge", {"resources": {"limits": {"nvidia.com/gpu": 1}}}),
     "spec.merge.resources.limits", "merge.gpus"),
    ("quantity", with_path(GOOD, "spec.merge", {"resources": {"requests": {"cpu": "lots"}}}),
     "spec.merge.resources.requests.cpu", "should match"),
    ("toleration-operator", with_path(GOOD, "spec.merge", {"tolerations": [{"operator": "Maybe"}]}),
     "spec.merge.tolerations[0].operator", "Unsupported value"),
    ("unknown-spec-field", with_path(GOOD, "spec.fooBar", 1), "spec.fooBar", "unknown field"),
    ("unknown-merge-field", with_path(GOOD, "spec.merge", {"cron": "0 2 * * *"}), "spec.merge.cron",
     "unknown field"),
    ("name-too-long", with_path(GOOD, "metadata.name", "l" * 64), "metadata.name", "at most 63"),
]

AM_GOOD: dict[str, Any] = {"apiVersion": "privatefm.io/v1alpha1", "kind": "AdapterMerge",
                           "metadata": {"name": "placeholder"}, "spec": {"trigger": "Manual"}}
MALFORMED_AM: list[tuple[str, dict[str, Any], str, str]] = [
    ("am-trigger", with_path(AM_GOOD, "spec.trigger", "Nightly"), "spec.trigger", "Unsupported value"),
    ("am-adapterSeq", with_path(AM_GOOD, "spec.adapterSeq", -1), "spec.adapterSeq", "greater than or equal"),
    ("am-baseVersion-type", with_path(AM_GOOD, "spec.baseVersion", "latest"), "spec.baseVersion", "integer"),
    ("am-name-dots", with_path(AM_GOOD, "metadata.name", "merge.one"), "metadata.name", "DNS label"),
    ("am-unknown", with_path(AM_GOOD, "spec.priority", "high"), "spec.priority", "unknown field"),
]


@pytest.fixture(scope="session")
def crds(kube: Kube) -> None:
    kube.kubectl("apply", "-k", str(REPO / "crds"))
    kube.kubectl("wait", "--for=condition=Established", "crd/learnernamespaces.privatefm.io",
                 "crd/adaptermerges.privatefm.io", "--timeout=60s")


# ---- no server needed ------------------------------------------------------------------------
def test_committed_crds_equal_generated() -> None:
    for directory in crdgen.CRD_DIRS:
        for name, text in crdgen.files().items():
            assert (directory / name).read_text() == text, f"{directory}/{name} is stale: run privatefm-crdgen"


def test_generated_schema_is_structural_and_default_free() -> None:
    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            assert "$ref" not in node and "anyOf" not in node and "title" not in node, path
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


def test_samples_parse_with_operator_defaults() -> None:
    ada = LearnerNamespace.model_validate(load("learnernamespace.yaml"))
    assert ada.spec.merge_settings().time_zone == "Europe/Berlin"
    bo = LearnerNamespace.model_validate(load("learnernamespace-minimal.yaml"))
    assert bo.spec.merge_settings().schedule == "0 2 * * *"
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
    assert proc.returncode != 0 and "spec is immutable" in proc.stderr, proc.stderr


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
