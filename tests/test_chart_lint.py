"""The chart and the kustomize base pass the linters platform teams run on them.

- ``helm lint --strict`` on the chart's defaults and every ``ci/*-values.yaml``;
- ``kubeconform -strict`` on what ``helm template`` renders (defaults, every ci values file),
  ``kubectl kustomize manifests`` and the samples, against JSON schemas made here: the core kinds'
  from the local API server's ``/openapi/v2`` (kubeconform would download them; nothing outside is
  reachable), privatefm's from ``crds/`` (openapi2jsonschema's ``{kind}_{version}.json`` layout);
- ``kube-linter`` with ``.kube-linter.yaml``, where every disabled check has its reason beside it
  (skipped where its Go module cannot be fetched, see scripts/build-tools.sh);
- ``kube-score`` with ``.kube-score.yaml`` (turned into flags here), which runs everywhere: every
  ignored check has its reason beside it and is shown to hide only the findings it names.

Besides the defaults and the ci values, the chart is rendered with ``shards=2, replicas=2`` ("sharded"):
only then does it render a PodDisruptionBudget and a podAntiAffinity, which the linters check.

The only kinds no schema exists for here are the Prometheus Operator's ServiceMonitor and
PrometheusRule (their CRDs are not part of this repository): kubeconform skips them, by name; promtool
checks the rule (tests/test_monitoring.py).
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from privatefm_testing.cluster import BIN
from privatefm_testing.kube import Kube

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "privatefm-operator"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
SCENARIOS = ["defaults", *(p.name for p in CI_VALUES), "sharded", "kustomize", "samples"]
SHARDED = ["--set", "shards=2", "--set", "replicas=2"]
# monitoring.coreos.com: the Prometheus Operator's CRDs are not in this repo (the PrometheusRule is
# checked by promtool instead: tests/test_monitoring.py).
SKIPPED_KINDS = ["ServiceMonitor", "PrometheusRule"]
KUBE_LINTER = BIN / "kube-linter"
KUBE_LINTER_CONFIG = REPO / ".kube-linter.yaml"
KUBE_SCORE = BIN / "kube-score"
KUBE_SCORE_CONFIG = REPO / ".kube-score.yaml"


def run(*cmd: str | Path, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(c) for c in cmd], text=True, capture_output=True, input=input, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{shlex.join(str(c) for c in cmd)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def render(scenario: str) -> str:
    """The YAML stream a scenario produces (release privatefm-operator in privatefm-system)."""
    if scenario == "kustomize":
        return run(BIN / "kubectl", "kustomize", REPO / "manifests").stdout
    if scenario == "samples":
        return "\n---\n".join(p.read_text() for p in sorted((REPO / "manifests" / "samples").glob("*.yaml")))
    values = {"defaults": [], "sharded": SHARDED}.get(scenario, ["-f", str(CHART / "ci" / scenario)])
    return run(BIN / "helm", "template", "privatefm-operator", CHART, "--namespace", "privatefm-system",
               *values).stdout


# ---- helm lint -------------------------------------------------------------------------------


@pytest.mark.parametrize("values", [None, *CI_VALUES], ids=lambda p: p.name if p else "defaults")
def test_helm_lint_strict(values: Path | None) -> None:
    proc = run(BIN / "helm", "lint", "--strict", CHART, *(["-f", str(values)] if values else []))
    assert "0 chart(s) failed" in proc.stdout, proc.stdout


# ---- the CRD generator emits schemas JSON Schema tools accept --------------------------------


def _walk(node: Any, path: str = "") -> Any:
    if isinstance(node, dict):
        yield path, node
        for key, child in node.items():
            yield from _walk(child, f"{path}/{key}")
    elif isinstance(node, list):
        for i, child in enumerate(node):
            yield from _walk(child, f"{path}/{i}")


def test_crd_schemas_have_no_empty_required() -> None:
    """JSON Schema draft 4 (kubeconform, kubectl-validate) rejects ``required: []``."""
    for path in sorted((REPO / "crds").glob("privatefm.io_*.yaml")):
        for where, node in _walk(yaml.safe_load(path.read_text())):
            assert node.get("required", ["x"]) != [], f"{path.name}{where}: required: []"


# ---- JSON schemas for kubeconform ------------------------------------------------------------

INT_OR_STRING = {"oneOf": [{"type": "string"}, {"type": "integer"}]}
QUANTITY = {"oneOf": [{"type": "string"}, {"type": "number"}]}
NAME_MAPS = {"properties", "patternProperties", "definitions"}


def strict(node: Any) -> Any:
    """openapi2jsonschema's --strict: objects that list properties reject others; int-or-string and
    nullable become JSON Schema."""
    if isinstance(node, list):
        return [strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    # Maps of names (a property may be called "nullable") hold schemas; their keys are no keywords.
    out = {k: ({name: strict(v2) for name, v2 in v.items()} if k in NAME_MAPS and isinstance(v, dict) else strict(v))
           for k, v in node.items()}
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out.update(INT_OR_STRING)
    if out.pop("nullable", False) and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if "properties" in out and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def kubeconform_suffix(api_version: str) -> str:
    """kubeconform's {{ .KindSuffix }}: -<first label of the group>-<version>, or -<version> for core."""
    group, _, version = api_version.rpartition("/")
    return f"-{group.split('.')[0].lower()}-{version}" if group else f"-{version}"


def core_schemas(openapi: dict[str, Any], out: Path) -> int:
    """One self-contained schema per kind of the API server: {kind}{suffix}.json, the kind's
    definition with every definition it reaches under ``definitions`` (``$ref``s stay as they are)."""
    defs = openapi["definitions"]
    converted = {name: strict(d) for name, d in defs.items()}
    converted["io.k8s.apimachinery.pkg.util.intstr.IntOrString"] = INT_OR_STRING
    converted["io.k8s.apimachinery.pkg.api.resource.Quantity"] = QUANTITY
    written = 0
    for name, definition in defs.items():
        for gvk in definition.get("x-kubernetes-group-version-kind", []):
            if gvk["kind"].endswith("List") or "apiVersion" not in definition.get("properties", {}):
                continue
            reached: dict[str, Any] = {}
            todo = [name]
            while todo:
                current = todo.pop()
                if current in reached:
                    continue
                reached[current] = converted[current]
                todo += re.findall(r'"#/definitions/([^"]+)"', json.dumps(converted[current]))
            schema = copy.deepcopy(converted[name])
            schema["definitions"] = reached
            api_version = f"{gvk['group']}/{gvk['version']}" if gvk["group"] else gvk["version"]
            target = out / f"{gvk['kind'].lower()}{kubeconform_suffix(api_version)}.json"
            target.write_text(json.dumps(schema))
            written += 1
    return written


def crd_schemas(out: Path) -> list[str]:
    """openapi2jsonschema's layout for CRDs: {kind}_{version}.json, from crds/*.yaml."""
    names = []
    for path in sorted((REPO / "crds").glob("privatefm.io_*.yaml")):
        crd = yaml.safe_load(path.read_text())
        kind = crd["spec"]["names"]["kind"].lower()
        for version in crd["spec"]["versions"]:
            schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
            schema["properties"]["metadata"] = {"type": "object"}  # the API server's ObjectMeta
            name = f"{kind}_{version['name']}.json"
            (out / name).write_text(json.dumps(strict(schema)))
            names.append(name)
    return names


@pytest.fixture(scope="module")
def schemas(kube: Kube, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("schemas")
    openapi = json.loads(kube.kubectl("get", "--raw", "/openapi/v2").stdout)
    assert core_schemas(openapi, out) > 50
    assert crd_schemas(out) == ["adaptermerge_v1alpha1.json", "learnernamespace_v1alpha1.json"]
    return out


def kubeconform(schemas: Path, text: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return run(BIN / "kubeconform", "-strict", "-summary", "-output", "text",
               "-schema-location", f"{schemas}/{{{{ .ResourceKind }}}}{{{{ .KindSuffix }}}}.json",
               "-schema-location", f"{schemas}/{{{{ .ResourceKind }}}}_{{{{ .ResourceAPIVersion }}}}.json",
               "-skip", ",".join(SKIPPED_KINDS), *extra, "-", input=text, check=False)


@pytest.mark.cluster
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_kubeconform_strict(schemas: Path, scenario: str) -> None:
    text = render(scenario)
    proc = kubeconform(schemas, text)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = re.search(r"Summary: (\d+) resources? found .*?Valid: (\d+), Invalid: (\d+), Errors: (\d+), "
                        r"Skipped: (\d+)", proc.stdout)
    assert summary, proc.stdout
    found, valid, invalid, errors, skipped = map(int, summary.groups())
    kinds = [d["kind"] for d in yaml.safe_load_all(text) if d]
    assert found == len(kinds) and invalid == errors == 0
    assert skipped == sum(k in SKIPPED_KINDS for k in kinds) and valid == found - skipped


@pytest.mark.cluster
def test_kubeconform_bites(schemas: Path) -> None:
    """The schemas are strict: an unknown field and a wrong type in a CR or a StatefulSet fail."""
    sample = yaml.safe_load((REPO / "manifests" / "samples" / "learnernamespace-minimal.yaml").read_text())
    bad_cr = copy.deepcopy(sample)
    bad_cr["spec"]["learnerID"] = "typo"
    bad_type = copy.deepcopy(sample)
    bad_type["spec"]["baseModel"]["version"] = "one"
    deployment = next(d for d in yaml.safe_load_all(render("defaults")) if d and d["kind"] == "StatefulSet")
    bad_deployment = copy.deepcopy(deployment)
    bad_deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    for bad in (bad_cr, bad_type, bad_deployment):
        proc = kubeconform(schemas, yaml.safe_dump(bad))
        assert proc.returncode != 0 and "is invalid" in proc.stdout, (bad["kind"], proc.stdout)


# ---- kube-linter -----------------------------------------------------------------------------


def test_kube_linter_config_gives_a_reason_for_every_disabled_check() -> None:
    lines = KUBE_LINTER_CONFIG.read_text().splitlines()
    config = yaml.safe_load("\n".join(lines))
    excluded = config["checks"]["exclude"]
    assert excluded, "nothing disabled: drop this test's premise"
    for check in excluded:
        (line,) = [line for line in lines if re.match(rf"\s*-\s*{re.escape(check)}\s*(#|$)", line)]
        reason = line.split("#", 1)[1].strip() if "#" in line else ""
        assert len(reason) > 20, f"{check}: no reason written beside it"


@pytest.mark.skipif(not KUBE_LINTER.exists(), reason="kube-linter is not built: the Go module proxy refuses "
                    "golang.stackrox.io/kube-linter (see scripts/build-tools.sh, PRIVATEFM_KUBE_LINTER_SRC)")
@pytest.mark.parametrize("scenario", [s for s in SCENARIOS if s != "samples"])
def test_kube_linter(scenario: str, tmp_path: Path) -> None:
    target = tmp_path / "objects.yaml"
    target.write_text(render(scenario))
    proc = run(KUBE_LINTER, "lint", "--config", KUBE_LINTER_CONFIG, target, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---- kube-score ------------------------------------------------------------------------------

# What each ignored check finds when it is not ignored, (kind, summary) on every scenario: an ignore
# hides exactly this and nothing else.
KUBE_SCORE_IGNORED_FINDINGS = {
    "container-image-pull-policy": {("StatefulSet", "ImagePullPolicy is not set to Always")},
    "pod-networkpolicy": {("StatefulSet", "The pod does not have a matching egress NetworkPolicy")},
}
KUBE_SCORE_SECTIONS = ["ignore", "enable", "optionalLeftOff"]
needs_kube_score = pytest.mark.skipif(not KUBE_SCORE.exists(), reason="kube-score is not built: run "
                                      "scripts/build-tools.sh (github.com/zegl/kube-score, KUBE_SCORE_VERSION)")


def kube_score_config() -> dict[str, list[str]]:
    config: dict[str, list[str]] = yaml.safe_load(KUBE_SCORE_CONFIG.read_text())
    return config


def kubernetes_minor() -> str:
    """v1.33 from KUBERNETES_VERSION=v1.33.13 in scripts/versions.env: what kube-score's
    stable-version check compares apiVersions against."""
    (version,) = re.findall(r"^KUBERNETES_VERSION=(v\d+\.\d+)\.\d+$",
                            (REPO / "scripts" / "versions.env").read_text(), re.MULTILINE)
    return version


def kube_score(text: str, output: str = "ci", ignore: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    """kube-score as .kube-score.yaml says: a warning fails too, no object can silence a check with a
    kube-score/ignore annotation. ``ignore`` replaces the config's ignored checks."""
    config = kube_score_config()
    flags = [f"--ignore-test={check}" for check in (config["ignore"] if ignore is None else ignore)]
    flags += [f"--enable-optional-test={check}" for check in config["enable"]]
    return run(KUBE_SCORE, "score", "--output-format", output, "--exit-one-on-warning",
               "--disable-ignore-checks-annotations", "--kubernetes-version", kubernetes_minor(), *flags, "-",
               input=text, check=False)


def kube_score_findings(text: str, ignore: list[str] | None = None) -> set[tuple[str, str, str]]:
    """(kind, check id, summary) of every finding that fails the run (grade warning or critical)."""
    proc = kube_score(text, "json", ignore)
    found = {(obj["type_meta"]["kind"], check["check"]["id"], comment["summary"])
             for obj in json.loads(proc.stdout)
             for check in obj["checks"] if not check["skipped"] and check["grade"] <= 5
             for comment in check["comments"] or [{"summary": ""}]}
    assert (proc.returncode != 0) == bool(found), (proc.returncode, found, proc.stderr)
    return found


def test_kube_score_config_gives_a_reason_for_every_entry() -> None:
    lines = KUBE_SCORE_CONFIG.read_text().splitlines()
    config = kube_score_config()
    assert sorted(config) == sorted(KUBE_SCORE_SECTIONS)
    assert config["ignore"], "nothing ignored: drop this test's premise"
    entries = [check for section in KUBE_SCORE_SECTIONS for check in config[section]]
    assert len(entries) == len(set(entries)), "a check in two places"
    for check in entries:
        (line,) = [line for line in lines if re.match(rf"\s*-\s*{re.escape(check)}\s*(#|$)", line)]
        reason = line.split("#", 1)[1].strip() if "#" in line else ""
        assert len(reason) > 20, f"{check}: no reason written beside it"
    assert set(config["ignore"]) == set(KUBE_SCORE_IGNORED_FINDINGS), \
        "say in KUBE_SCORE_IGNORED_FINDINGS what a newly ignored check finds"


def test_install_docs_run_kube_score_as_the_suite_does() -> None:
    """docs/install.md spells out the flags this file builds from .kube-score.yaml."""
    docs = (REPO / "docs" / "install.md").read_text()
    command = " ".join(docs.split("| kube-score score", 1)[1].split("```", 1)[0].replace("\\\n", " ").split())
    config = kube_score_config()
    flags = re.findall(r"--(ignore-test|enable-optional-test) (\S+)", command)
    assert sorted(flags) == sorted([("ignore-test", c) for c in config["ignore"]]
                                   + [("enable-optional-test", c) for c in config["enable"]]), command
    for flag in ("--exit-one-on-warning", "--disable-ignore-checks-annotations",
                 f"--kubernetes-version {kubernetes_minor()}"):
        assert flag in command, command


@needs_kube_score
def test_kube_score_config_names_its_real_checks() -> None:
    """Every name is one of kube-score's checks (a typo would ignore or enable nothing), and every
    optional check is either enabled or left off with a reason: a new one in an upgrade fails here."""
    listed = [line.split(",") for line in run(KUBE_SCORE, "list").stdout.splitlines() if line]
    default = {row[0] for row in listed if row[-1] == "default"}
    optional = {row[0] for row in listed if row[-1] == "optional"}
    config = kube_score_config()
    assert set(config["ignore"]) <= default
    assert sorted(config["enable"] + config["optionalLeftOff"]) == sorted(optional)


@needs_kube_score
@pytest.mark.parametrize("scenario", [s for s in SCENARIOS if s != "samples"])
def test_kube_score(scenario: str) -> None:
    text = render(scenario)
    proc = kube_score(text)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[OK] privatefm-operator" in proc.stdout, proc.stdout
    # Not ignoring anything finds exactly what each ignored check is there for.
    expected = {(kind, check, summary) for check, found in KUBE_SCORE_IGNORED_FINDINGS.items()
                for kind, summary in found}
    assert kube_score_findings(text, ignore=[]) == expected


def _mutated(scenario: str, kind: str, change: Callable[[dict[str, Any]], None] | None) -> str:
    """The scenario's objects with its one ``kind`` changed in place, or left out (``change`` None)."""
    docs = [d for d in yaml.safe_load_all(render(scenario)) if d]
    (target,) = [d for d in docs if d["kind"] == kind]
    if change is None:
        docs.remove(target)
    else:
        change(target)
    return yaml.safe_dump_all(docs)


def _no_resources_no_security_context(statefulset: dict[str, Any]) -> None:
    container = statefulset["spec"]["template"]["spec"]["containers"][0]
    del container["resources"], container["securityContext"]


def _no_affinity(statefulset: dict[str, Any]) -> None:
    del statefulset["spec"]["template"]["spec"]["affinity"]


def _not_headless(service: dict[str, Any]) -> None:
    del service["spec"]["clusterIP"]


@needs_kube_score
@pytest.mark.parametrize(("scenario", "kind", "change", "checks"), [
    ("defaults", "StatefulSet", _no_resources_no_security_context,
     {"container-resources", "container-ephemeral-storage-request-and-limit",
      "container-security-context-readonlyrootfilesystem"}),
    ("defaults", "Service", _not_headless, {"statefulset-has-servicename"}),
    ("sharded", "PodDisruptionBudget", None, {"statefulset-has-poddisruptionbudget"}),
    # A warning: --exit-one-on-warning makes it fail the run.
    ("sharded", "StatefulSet", _no_affinity, {"statefulset-has-host-podantiaffinity"}),
], ids=["no-resources-or-securitycontext", "service-not-headless", "no-pdb", "no-anti-affinity"])
def test_kube_score_bites(scenario: str, kind: str, change: Callable[[dict[str, Any]], None] | None,
                          checks: set[str]) -> None:
    """A worse copy of a rendered scenario fails, naming the checks that catch it: test_kube_score
    cannot pass by construction."""
    bad = _mutated(scenario, kind, change)
    proc = kube_score(bad)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert {check for _, check, _ in kube_score_findings(bad)} == checks
