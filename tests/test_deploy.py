"""How the operator is installed: manifests/ (kustomize), the Helm chart and Dockerfile.operator.

Rendering and linting use the real kubectl and helm; the cluster tests hand the result to the real
API server (RBAC, Pod Security admission, CRD validation). No Pod ever runs here: there is no kubelet.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import certifi
import pytest
import yaml
from privatefm_operator.settings import Settings
from privatefm_testing import seed
from privatefm_testing.cluster import BIN, S3Info
from privatefm_testing.kube import Kube
from privatefm_testing.operator_proc import OperatorProcess

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = REPO / "manifests"
CHART = REPO / "charts" / "privatefm-operator"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
SOURCES = ["manifests", "chart"]
SECRET_SETTINGS = {"s3_access_key", "s3_secret_key"}
# Values that are Kubernetes objects, documented as a whole rather than key by key.
GUARDIAN = "parent-of-bo"  # the guardian of manifests/samples/learnernamespace-minimal.yaml
K8S_VALUES = {"resources", "podSecurityContext", "securityContext", "livenessProbe", "readinessProbe"}


def run(*cmd: str | Path, env: dict[str, str] | None = None, check: bool = True,
        input: str | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(c) for c in cmd], env=env, text=True, capture_output=True, input=input,
                          timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"{shlex.join(str(c) for c in cmd)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def load_all(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


@functools.cache
def _kustomized() -> str:
    return run(BIN / "kubectl", "kustomize", MANIFESTS).stdout


@functools.cache
def _helm_template(*args: str) -> str:
    return run(BIN / "helm", "template", "privatefm-operator", CHART, "--namespace", "privatefm-system",
               *args).stdout


def rendered(source: str, *helm_args: str) -> list[dict[str, Any]]:
    """What `kubectl kustomize manifests` or `helm template` (release privatefm-operator) produce."""
    return load_all(_kustomized() if source == "manifests" else _helm_template(*helm_args))


def of_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = of_kind(objs, kind)
    assert len(found) == 1, f"expected one {kind}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def grants(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    """A role's rules as (apiGroup, resource, verb) triples, so differently grouped rules compare equal."""
    return {(group, resource, verb)
            for rule in role["rules"]
            for group in rule.get("apiGroups", [])
            for resource in rule.get("resources", [])
            for verb in rule.get("verbs", [])}


PEOPLE_ROLES = ("learner-admin", "guardian")  # unbound ClusterRoles for people (manifests/people-roles.yaml)
AGGREGATED_ROLES = ("view", "edit")  # aggregated into the built-in view/edit/admin (aggregate-roles.yaml)


def operator_roles(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The operator's own ClusterRoles: the rendered ones, less the roles for people."""
    return [role for role in of_kind(objs, "ClusterRole")
            if not role["metadata"]["name"].endswith(PEOPLE_ROLES + AGGREGATED_ROLES)]


def roles_by_part(objs: list[dict[str, Any]]) -> dict[str, set[tuple[str, str, str]]]:
    """{"framework": ..., "application": ...} from the operator's ClusterRoles, whatever their prefix."""
    return {role["metadata"]["name"].rsplit("-", 1)[1]: grants(role) for role in operator_roles(objs)}


def lease_grants(objs: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    """The Role of the shards' Leases: exactly these verbs, on Leases alone."""
    (role,) = of_kind(objs, "Role")
    assert role["metadata"]["name"].endswith("-leases")
    assert grants(role) == {("coordination.k8s.io", "leases", verb) for verb in ("get", "list", "create", "patch")}
    return grants(role)


# ---- RBAC ------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", SOURCES)
def test_rbac_grants_no_wildcard(source: str) -> None:
    objs = rendered(source)
    roles = of_kind(objs, "ClusterRole") + of_kind(objs, "Role")
    assert sorted(roles_by_part(objs)) == ["application", "framework"]
    assert [lease_grants(objs)] == [grants(r) for r in of_kind(objs, "Role")]
    # The default install also ships the roles for people, unbound.
    people = {r["metadata"]["name"].removeprefix("privatefm-").removeprefix("operator-")
              for r in of_kind(objs, "ClusterRole") if r["metadata"]["name"].endswith(PEOPLE_ROLES)}
    assert people == set(PEOPLE_ROLES)
    assert len(roles) == 3 + len(PEOPLE_ROLES) + len(AGGREGATED_ROLES)
    for role in roles:
        for rule in role["rules"]:
            assert "nonResourceURLs" not in rule, rule
            for field in ("apiGroups", "resources", "verbs", "resourceNames"):
                assert not [v for v in rule.get(field, []) if "*" in v], (role["metadata"]["name"], rule)
            assert rule["verbs"] and rule["resources"], rule


def test_rbac_is_the_same_in_manifests_and_chart() -> None:
    from_manifests = roles_by_part(rendered("manifests"))
    from_chart = roles_by_part(rendered("chart"))
    for part in ("framework", "application"):
        assert from_manifests[part] == from_chart[part], (
            part, sorted(from_manifests[part] ^ from_chart[part]))
    assert lease_grants(rendered("manifests")) == lease_grants(rendered("chart"))


def test_rbac_covers_every_resource_the_operator_calls() -> None:
    """Each kind privatefm_operator.kube talks to is granted: Events are created, Pods listed, the
    rest at least patched (server-side apply); reads are pinned by test_operator_rbac_is_exactly_what_it_calls."""
    from privatefm_operator.kube import RESOURCES

    granted = set().union(*roles_by_part(rendered("manifests")).values(), lease_grants(rendered("manifests")))
    for kind, (prefix, plural, _namespaced) in RESOURCES.items():
        if kind == "LocalQueue":  # only with Kueue, below
            continue
        group = "" if prefix == "/api/v1" else prefix.split("/")[2]
        verb = {"Event": "create", "Pod": "list"}.get(kind, "patch")
        assert (group, plural, verb) in granted, kind
    # LocalQueues only where the operator makes them: the chart with kueue.clusterQueue set.
    kueue = set().union(*roles_by_part(rendered("chart", "--set", "kueue.queueName=merges",
                                                "--set", "kueue.clusterQueue=gpus")).values())
    assert {v for g, r, v in kueue if (g, r) == ("kueue.x-k8s.io", "localqueues")} == {"list", "watch", "create",
                                                                                        "patch"}
    assert not {(g, r) for g, r, _ in granted if g == "kueue.x-k8s.io"}
    for status in ("learnernamespaces/status", "adaptermerges/status"):
        assert ("privatefm.io", status, "patch") in granted


@pytest.mark.parametrize("source", SOURCES)
def test_bindings_tie_both_roles_to_the_operator_service_account(source: str) -> None:
    objs = rendered(source)
    account = one(objs, "ServiceAccount")["metadata"]
    roles = {r["metadata"]["name"] for r in operator_roles(objs)}
    bindings = of_kind(objs, "ClusterRoleBinding")
    assert {b["roleRef"]["name"] for b in bindings} == roles
    for binding in bindings:
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["name"],
                                        "namespace": account["namespace"]}]
    # The shards' Leases: a Role in the operator's own namespace, bound to the same account.
    (role,), (binding,) = of_kind(objs, "Role"), of_kind(objs, "RoleBinding")
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == account["namespace"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["name"],
                                    "namespace": account["namespace"]}]
    pod = one(objs, "StatefulSet")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account["name"]


# ---- the operator's Pod and settings ---------------------------------------------------------


@pytest.mark.parametrize("source", SOURCES)
def test_statefulset_runs_one_hardened_operator(source: str) -> None:
    objs = rendered(source)
    deployment = one(objs, "StatefulSet")
    assert deployment["metadata"]["namespace"] == "privatefm-system"
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["podManagementPolicy"] == "Parallel"
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 65532
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "capabilities": {"drop": ["ALL"]}}
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert container["ports"] == [{"name": "http-metrics", "containerPort": 8080, "protocol": "TCP"}]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    tmp = next(v for v in pod["volumes"] if v["name"] == "tmp")
    assert "emptyDir" in tmp
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    # The Pod reads the ConfigMap that ships beside it. Neither source ships a Secret by default: the
    # kustomize base refers to privatefm-operator-s3 as optional (created by the user or an overlay),
    # the chart's defaults use workload identity (no key variables at all).
    assert container["envFrom"] == [{"configMapRef": {"name": one(objs, "ConfigMap")["metadata"]["name"]}}]
    assert not of_kind(objs, "Secret")
    lease_namespace = {"name": "PRIVATEFM_LEASE_NAMESPACE",
                       "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}
    assert container["env"][0] == lease_namespace
    if source == "manifests":
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"][1:]}
        assert refs == {"PRIVATEFM_S3_ACCESS_KEY": {"name": "privatefm-operator-s3", "key": "accessKey",
                                                    "optional": True},
                        "PRIVATEFM_S3_SECRET_KEY": {"name": "privatefm-operator-s3", "key": "secretKey",
                                                    "optional": True}}
    else:
        assert container["env"] == [lease_namespace]
    service = one(objs, "Service")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"][0]["name"] == "http-metrics"
    assert service["spec"]["ports"][0]["port"] == 8080
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_config_is_every_setting_at_its_default_and_the_same_in_both() -> None:
    """The ConfigMaps name real settings (a typo would be silently ignored) and ship the code's defaults."""
    manifests = one(rendered("manifests"), "ConfigMap")["data"]
    chart = one(rendered("chart"), "ConfigMap")["data"]
    assert manifests == chart
    fields = {key.removeprefix("PRIVATEFM_").lower(): value for key, value in manifests.items()}
    assert all(key.startswith("PRIVATEFM_") for key in manifests)
    assert set(fields) == set(Settings.model_fields) - SECRET_SETTINGS
    shipped = Settings(**fields).model_dump()
    defaults = {name: field.default for name, field in Settings.model_fields.items()}
    assert shipped == defaults


def test_chart_runs_shards_times_replicas_pods() -> None:
    """Pod k serves shard k mod shards (the operator reads its ordinal), so shards x replicas Pods
    give each shard one holder and replicas - 1 standbys."""
    objs = rendered("chart", "--set", "shards=3", "--set", "replicas=2", "--set", "lease.durationSeconds=20")
    assert one(objs, "StatefulSet")["spec"]["replicas"] == 6
    data = one(objs, "ConfigMap")["data"]
    settings = Settings(**{k.removeprefix("PRIVATEFM_").lower(): v for k, v in data.items()
                           if k != "PRIVATEFM_LEASE_NAMESPACE"}, lease_namespace="privatefm-system")
    assert (settings.shards, settings.lease_duration_seconds) == (3, 20)
    assert [settings.shard(f"privatefm-operator-{k}").index for k in range(6)] == [0, 1, 2, 0, 1, 2]


def test_chart_settings_follow_values() -> None:
    data = one(rendered("chart", "--set", "merge.cpu=4", "--set", "resyncSeconds=30.5",
                        "--set", "mergeImage.digest=sha256:" + "a" * 64), "ConfigMap")["data"]
    assert data["PRIVATEFM_MERGE_CPU"] == "4"
    assert data["PRIVATEFM_RESYNC_SECONDS"] == "30.5"
    assert data["PRIVATEFM_MERGE_IMAGE"] == "ghcr.io/privatefm/merge@sha256:" + "a" * 64


def test_chart_uses_an_existing_secret_instead_of_rendering_one() -> None:
    objs = rendered("chart", "--set", "s3.existingSecret=my-s3")
    assert not of_kind(objs, "Secret")
    env = one(objs, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {e["valueFrom"]["secretKeyRef"]["name"] for e in env if "secretKeyRef" in e["valueFrom"]} == {"my-s3"}


def test_chart_renders_a_secret_only_with_both_keys_and_rolls_on_it() -> None:
    objs = rendered("chart", "--set", "s3.accessKey=a", "--set", "s3.secretKey=b")
    secret = one(objs, "Secret")
    assert secret["data"] == {"accessKey": "YQ==", "secretKey": "Yg=="}
    template = one(objs, "StatefulSet")["spec"]["template"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in template["spec"]["containers"][0]["env"]
            if "secretKeyRef" in e["valueFrom"]}
    assert refs == {"PRIVATEFM_S3_ACCESS_KEY": {"name": secret["metadata"]["name"], "key": "accessKey"},
                    "PRIVATEFM_S3_SECRET_KEY": {"name": secret["metadata"]["name"], "key": "secretKey"}}
    rotated = one(rendered("chart", "--set", "s3.accessKey=a", "--set", "s3.secretKey=c"), "StatefulSet")
    annotations = template["metadata"]["annotations"]
    assert annotations["checksum/secret"] != rotated["spec"]["template"]["metadata"]["annotations"]["checksum/secret"]
    assert annotations["checksum/config"] == rotated["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    half = run(BIN / "helm", "template", "x", CHART, "--set", "s3.accessKey=a", check=False)
    assert half.returncode != 0 and "s3.accessKey and s3.secretKey go together" in half.stderr


def test_chart_ca_bundle_extra_env_volumes_and_probes() -> None:
    objs = rendered("chart", "--set", "caBundle.configMapName=corp-ca", "--set", "caBundle.key=bundle.pem",
                    "--set", "extraEnv[0].name=HTTPS_PROXY", "--set", "extraEnv[0].value=http://proxy:3128",
                    "--set", "extraVolumes[0].name=x", "--set", "extraVolumes[0].emptyDir.medium=Memory",
                    "--set", "extraVolumeMounts[0].name=x", "--set", "extraVolumeMounts[0].mountPath=/x",
                    "--set", "livenessProbe.periodSeconds=7", "--set", "podAnnotations.n=1",
                    "--set", "podLabels.team=ml", "--set", "podAnnotations.t=true")
    template = one(objs, "StatefulSet")["spec"]["template"]
    pod = template["spec"]
    (container,) = pod["containers"]
    assert {"name": "AWS_CA_BUNDLE", "value": "/etc/privatefm/ca/ca.crt"} in container["env"]
    assert {"name": "HTTPS_PROXY", "value": "http://proxy:3128"} in container["env"]
    assert {"name": "ca-bundle", "mountPath": "/etc/privatefm/ca", "readOnly": True} in container["volumeMounts"]
    assert {"name": "x", "mountPath": "/x"} in container["volumeMounts"]
    assert {"name": "ca-bundle", "configMap": {"name": "corp-ca", "items": [{"key": "bundle.pem", "path": "ca.crt"}]}} \
        in pod["volumes"]
    assert {"name": "x", "emptyDir": {"medium": "Memory"}} in pod["volumes"]
    assert container["livenessProbe"]["periodSeconds"] == 7
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert template["metadata"]["annotations"]["n"] == "1" and template["metadata"]["annotations"]["t"] == "true"
    assert template["metadata"]["labels"]["team"] == "ml"
    # Merge and verify pods get the same bundle through the operator's settings.
    data = one(objs, "ConfigMap")["data"]
    settings = Settings(**{k.removeprefix("PRIVATEFM_").lower(): v for k, v in data.items()})
    assert (settings.ca_bundle_configmap, settings.ca_bundle_key) == ("corp-ca", "bundle.pem")


@pytest.mark.parametrize("source", SOURCES)
def test_aggregated_roles_extend_view_and_edit(source: str) -> None:
    roles = {r["metadata"]["name"].rsplit("-", 1)[1]: r for r in of_kind(rendered(source), "ClusterRole")
             if r["metadata"]["name"].endswith(AGGREGATED_ROLES)}
    assert set(roles) == set(AGGREGATED_ROLES)
    labels = {part: {k.rsplit("-", 1)[1] for k, v in r["metadata"]["labels"].items()
                     if k.startswith("rbac.authorization.k8s.io/aggregate-to-") and v == "true"}
              for part, r in roles.items()}
    assert labels == {"view": {"view", "edit", "admin"}, "edit": {"edit", "admin"}}
    assert grants(roles["view"]) == {("privatefm.io", res, verb) for res in ("learnernamespaces", "adaptermerges")
                                     for verb in ("get", "list", "watch")}
    assert ("privatefm.io", "adaptermerges", "create") in grants(roles["edit"])
    assert not [g for role in roles.values() for g in grants(role) if g[1].endswith("/status")]


def test_kustomize_base_holds_no_secret_and_the_overlay_generates_one(tmp_path: Path) -> None:
    assert not of_kind(rendered("manifests"), "Secret")
    for tree in ("manifests", "crds", "overlays"):  # a copy, so that s3.env never lands in the repo
        shutil.copytree(REPO / tree, tmp_path / tree)
    overlay = tmp_path / "overlays" / "static-keys"
    (overlay / "s3.env").write_text("accessKey=AK\nsecretKey=SK\n")
    objs = load_all(run(BIN / "kubectl", "kustomize", overlay).stdout)
    secret = one(objs, "Secret")
    assert secret["metadata"]["name"].startswith("privatefm-operator-s3-")
    env = one(objs, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {e["valueFrom"]["secretKeyRef"]["name"] for e in env if "secretKeyRef" in e["valueFrom"]} == {
        secret["metadata"]["name"]}


def test_service_monitor_only_when_enabled() -> None:
    assert not of_kind(rendered("chart"), "ServiceMonitor")
    objs = rendered("chart", "-f", str(CHART / "ci" / "servicemonitor-values.yaml"))
    monitor = one(objs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["endpoints"][0]["port"] == one(objs, "Service")["spec"]["ports"][0]["name"]
    assert monitor["spec"]["selector"]["matchLabels"] == one(objs, "Service")["spec"]["selector"]


# ---- CRDs in the chart -----------------------------------------------------------------------


def test_chart_crds_are_the_generated_ones_and_kept() -> None:
    generated = {p.name: p.read_text() for p in sorted((REPO / "crds").glob("privatefm.io_*.yaml"))}
    copies = {p.name: p.read_text() for p in sorted((CHART / "files" / "crds").glob("*.yaml"))}
    assert copies == generated, "charts/privatefm-operator/files/crds/ is stale: run privatefm-crdgen"

    crds = {c["metadata"]["name"]: c for c in of_kind(rendered("chart"), "CustomResourceDefinition")}
    assert len(crds) == len(generated) == 2
    for text in generated.values():
        expected = yaml.safe_load(text)
        got = copy.deepcopy(crds[expected["metadata"]["name"]])
        assert got["metadata"].pop("annotations") == {"helm.sh/resource-policy": "keep"}
        assert got["metadata"].pop("labels")["app.kubernetes.io/managed-by"] == "Helm"
        assert got == expected

    unkept = of_kind(rendered("chart", "--set", "crds.keep=false"), "CustomResourceDefinition")
    assert unkept and not any(c["metadata"].get("annotations") for c in unkept)
    assert not of_kind(rendered("chart", "--set", "crds.enabled=false"), "CustomResourceDefinition")


# ---- chart hygiene ---------------------------------------------------------------------------


def test_ci_scenarios_exist() -> None:
    assert {p.name for p in CI_VALUES} >= {"default-values.yaml", "no-crds-values.yaml",
                                            "servicemonitor-values.yaml"}


@pytest.mark.parametrize("typo", ["imagee.tag=x", "s3.bukcet=x", "crds.keeep=false",
                                  "podSecurityContext.runAsUsr=1", "serviceMonitor.enable=true",
                                  "resources.request.cpu=1", "tolerations[0].efect=NoSchedule"])
def test_schema_rejects_a_typo_in_set(typo: str) -> None:
    proc = run(BIN / "helm", "template", "x", CHART, "--set", typo, check=False)
    assert proc.returncode != 0
    assert "additional properties" in proc.stderr, proc.stderr


def test_schema_accepts_the_documented_keys() -> None:
    run(BIN / "helm", "template", "x", CHART, "--set", "image.tag=x", "--set", "podSecurityContext.runAsUser=1000",
        "--set", "tolerations[0].effect=NoSchedule", "--set", "nodeSelector.pool=ops")


def test_schema_closes_every_object() -> None:
    """additionalProperties is false wherever properties are listed, and explicit on every other object."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert (CHART / "values.schema.json").read_text().count('"additionalProperties": false') > 20

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            if "properties" in node:
                assert node.get("additionalProperties") is False, path
            elif node.get("type") == "object":
                assert "additionalProperties" in node, path
            for key, child in node.items():
                walk(child, f"{path}/{key}")
        elif isinstance(node, list):
            for i, child in enumerate(node):
                walk(child, f"{path}/{i}")

    walk(schema, "")


def documented_values() -> list[tuple[str, bool]]:
    """(dotted key, whether a comment is right above it) for every key of values.yaml, in order."""
    out: list[tuple[str, bool]] = []
    stack: list[str] = []
    previous = ""
    for line in (CHART / "values.yaml").read_text().splitlines():
        match = re.match(r"^( *)([A-Za-z0-9_]+):", line)
        if match:
            stack = [*stack[: len(match.group(1)) // 2], match.group(2)]
            out.append((".".join(stack), previous.lstrip().startswith("#")))
        if line.strip():
            previous = line
    return out


def test_every_value_is_documented_in_values_and_readme() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    readme = (CHART / "README.md").read_text()

    def lookup(path: str) -> Any:
        node = values
        for key in path.split("."):
            node = node[key]
        return node

    for path, commented in documented_values():
        if path.split(".")[0] in K8S_VALUES and "." in path:
            continue  # documented as a whole object
        if isinstance(lookup(path), dict) and lookup(path) and path not in K8S_VALUES:
            continue  # a section; its keys are documented one by one
        assert commented, f"values.yaml: {path} has no comment"
        assert f"| `{path}` |" in readme, f"README.md: {path} missing from the values table"


# ---- the image -------------------------------------------------------------------------------


def test_dockerfile_runs_the_operator_as_non_root() -> None:
    lines = (REPO / "Dockerfile.operator").read_text().replace("\\\n", " ").splitlines()
    instructions = [line.split(None, 1) for line in lines if line.strip() and not line.startswith("#")]
    by_name: dict[str, list[str]] = {}
    for name, *rest in instructions:
        by_name.setdefault(name.upper(), []).append(rest[0] if rest else "")
    image = by_name["ARG"][0].split("=", 1)[1]  # pinned to an exact Python and Debian release
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", image), image
    assert by_name["FROM"] == ["${PYTHON_IMAGE} AS build", "${PYTHON_IMAGE}"]
    assert json.loads(by_name["ENTRYPOINT"][-1]) == ["privatefm-operator"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert "privatefm-operator" in scripts
    assert by_name["USER"][-1].split(":")[0] == "65532"
    assert by_name["EXPOSE"] == ["8080"]
    assert any(re.search(r"pip install --require-hashes -r locks/operator\.lock", r) for r in by_name["RUN"])
    assert any(re.search(r"pip install --no-deps /dist/privatefm-\*\.whl", r) for r in by_name["RUN"])
    for copy_args in by_name["COPY"]:
        if copy_args.startswith("--from"):
            continue
        *sources, _dest = copy_args.split()
        for source in sources:
            assert list(REPO.glob(source)) or "[" in source, f"COPY {source}: not in the repository"


# ---- against the real API server -------------------------------------------------------------


@pytest.mark.cluster
def test_kustomize_is_accepted_by_the_api_server(kube: Kube) -> None:
    """`kubectl apply -k manifests` passes server-side validation and Pod Security "restricted"."""
    created = kube.kubectl("get", "namespace", "privatefm-system", check=False).returncode != 0
    # A dry run cannot create the namespace the other objects go into, so that one is real.
    kube.kubectl("apply", "-f", str(MANIFESTS / "namespace.yaml"))
    try:
        proc = kube.kubectl("apply", "--dry-run=server", "-k", str(MANIFESTS))
        assert "(server dry run)" in proc.stdout
        assert "PodSecurity" not in proc.stderr, proc.stderr
        assert "statefulset.apps/privatefm-operator" in proc.stdout
    finally:
        if created:
            kube.kubectl("delete", "namespace", "privatefm-system", "--wait=false", check=False)


@pytest.mark.cluster
def test_chart_crds_are_accepted_by_the_api_server(kube: Kube) -> None:
    crds = of_kind(rendered("chart"), "CustomResourceDefinition")
    proc = kube.kubectl("apply", "--dry-run=server", "-f", "-",
                        input=json.dumps({"apiVersion": "v1", "kind": "List", "items": crds}))
    assert proc.stdout.count("(server dry run)") == 2


def pod_from(deployment: dict[str, Any], name: str) -> dict[str, Any]:
    template = deployment["spec"]["template"]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {**template["metadata"], "name": name},
            "spec": template["spec"]}


@pytest.mark.cluster
def test_helm_install_is_restricted_and_least_privilege(kube: Kube, namespace: str, uid: str) -> None:
    """A real `helm install` and `helm uninstall` (CRDs stay shared: crds.enabled=false)."""
    kube.kubectl("apply", "-k", str(REPO / "crds"))  # shared, as in test_api; `auth can-i` needs the types
    kube.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted",
                 "pod-security.kubernetes.io/warn=restricted")
    release = f"pfm-{uid}"
    helm = (BIN / "helm", "--kubeconfig", kube.kubeconfig, "--namespace", namespace)
    proc = run(*helm, "install", release, CHART, "-f", CHART / "ci" / "default-values.yaml",
               "--set", "crds.enabled=false", env=kube.env())
    try:
        assert "STATUS: deployed" in proc.stdout
        assert "PodSecurity" not in proc.stderr, proc.stderr
        deployment = json.loads(kube.kubectl("-n", namespace, "get", "statefulset", release + "-privatefm-operator",
                                             "-o", "json").stdout)

        # Pod Security is enforced on Pods, not on StatefulSets: the StatefulSet's Pod must be admitted
        # in a namespace enforcing "restricted", and a privileged variant must not (the check bites).
        pod = pod_from(deployment, f"restricted-{uid}")
        kube.kubectl("-n", namespace, "create", "--dry-run=server", "-f", "-", input=json.dumps(pod))
        privileged = copy.deepcopy(pod)
        privileged["spec"]["containers"][0]["securityContext"] = {"privileged": True}
        denied = kube.kubectl("-n", namespace, "create", "--dry-run=server", "-f", "-",
                              input=json.dumps(privileged), check=False)
        assert denied.returncode != 0 and "violates PodSecurity" in denied.stderr, denied.stderr

        # The ServiceAccount can do its job and nothing beyond it.
        account = f"system:serviceaccount:{namespace}:{deployment['spec']['template']['spec']['serviceAccountName']}"
        can = {"watch learnernamespaces.privatefm.io": True, "patch adaptermerges.privatefm.io/status": True,
               "create jobs.batch -n elsewhere": True, "create networkpolicies.networking.k8s.io -n x": True,
               "create events -n default": True, "delete secrets -n elsewhere": False,
               "create pods -n elsewhere": False, "get nodes": False, "delete learnernamespaces.privatefm.io": False,
               "create clusterroles.rbac.authorization.k8s.io": False}
        for question, expected in can.items():
            answer = kube.kubectl("auth", "can-i", *question.split(), f"--as={account}", check=False)
            assert (answer.stdout.strip() == "yes") is expected, (question, answer.stderr)
    finally:
        run(*helm, "uninstall", release, env=kube.env())
    left = kube.kubectl("get", "clusterrole", f"{release}-privatefm-operator-framework", check=False)
    assert left.returncode != 0 and "NotFound" in left.stderr


@pytest.mark.cluster
def test_helm_install_with_existing_secret_and_ca_bundle_runs_the_core_scenario(
        kube: Kube, s3: S3Info, operator: OperatorProcess, tmp_path: Path, uid: str) -> None:
    """The chart as a platform team installs it: store keys in an existing Secret, a private CA
    bundle, CRDs managed apart. The release is "privatefm-operator" in "privatefm-system", so it takes
    over the ServiceAccount, ClusterRoles, bindings and admission policies the session applied from
    manifests/ (--take-ownership) and from then on its RBAC is exactly the chart's: every binding of
    the ServiceAccount is the release's, with the chart's rules.

    No kubelet runs the chart's StatefulSet here. The session's one operator process is restarted in
    its place, under that ServiceAccount's token, with the release's ConfigMap as its environment, the
    keys read from the existing Secret, and AWS_CA_BUNDLE pointing at a local copy of the CA
    ConfigMap (the path differs from the Pod's /etc/privatefm/ca/ca.crt; the mount is checked on the
    rendered StatefulSet). Then the core scenario: a learner becomes Ready and one merge succeeds,
    its merge pod mounting the bundle from the learner's namespace (as trust-manager would place it).
    The local MinIO speaks plain HTTP, so the bundle is loaded but no TLS handshake uses it.
    """
    system, release, secret, ca = "privatefm-system", "privatefm-operator", f"store-{uid}", f"corp-ca-{uid}"
    bundle = Path(certifi.where()).read_text()
    kube.kubectl("-n", system, "create", "secret", "generic", secret,
                 f"--from-literal=accessKey={s3.operator.access_key}",
                 f"--from-literal=secretKey={s3.operator.secret_key}")
    kube.kubectl("-n", system, "create", "configmap", ca, f"--from-file=ca.crt={certifi.where()}")
    values = {"s3": {"endpoint": s3.endpoint, "bucket": s3.bucket, "existingSecret": secret, "timeoutSeconds": 1,
                     "unreachableGraceSeconds": 8},
              "caBundle": {"configMapName": ca},
              "crds": {"enabled": False},
              "mergeImage": {"repository": "privatefm/merge", "tag": "test"},
              "merge": {"gpus": 0},
              "resyncSeconds": 2, "integrityCheckSeconds": 3, "fallbackBackoffSeconds": 5}
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    helm = (BIN / "helm", "--kubeconfig", kube.kubeconfig, "--namespace", system)
    proc = run(*helm, "install", release, CHART, "-f", values_file, "--take-ownership", env=kube.env())
    assert "STATUS: deployed" in proc.stdout
    saved_env = dict(operator.env)
    try:
        # Exactly the chart's RBAC: every binding of the ServiceAccount belongs to the release, and
        # its roles hold the chart's rules.
        chart = load_all(run(BIN / "helm", "template", release, CHART, "--namespace", system,
                             "-f", values_file).stdout)
        account = {"kind": "ServiceAccount", "name": release, "namespace": system}
        bindings = [b for kind in ("clusterrolebindings", "rolebindings")
                    for b in json.loads(kube.kubectl("get", kind, "-A", "-o", "json").stdout)["items"]
                    if account in [{k: s.get(k) for k in account} for s in b.get("subjects") or []]]
        assert sorted(b["metadata"]["name"] for b in bindings) == sorted(
            b["metadata"]["name"] for kind in ("ClusterRoleBinding", "RoleBinding") for b in of_kind(chart, kind))
        for binding in bindings:
            assert binding["metadata"]["annotations"]["meta.helm.sh/release-name"] == release
            kind = binding["roleRef"]["kind"]  # ClusterRoles, and the Role of the shards' Leases
            live = json.loads(kube.kubectl("-n", system, "get", kind.lower(), binding["roleRef"]["name"],
                                           "-o", "json").stdout)
            rendered_role = next(r for r in of_kind(chart, kind) if r["metadata"]["name"] == binding["roleRef"]["name"])
            assert grants(live) == grants(rendered_role)

        deployment = json.loads(kube.kubectl("-n", system, "get", "statefulset", release, "-o", "json").stdout)
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert {"name": "AWS_CA_BUNDLE", "value": "/etc/privatefm/ca/ca.crt"} in container["env"]
        assert {e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"]
                if "secretKeyRef" in e.get("valueFrom", {})} == {secret}
        assert "checksum/secret" in deployment["spec"]["template"]["metadata"]["annotations"]

        # The operator, as the StatefulSet would run it.
        config = json.loads(kube.kubectl("-n", system, "get", "configmap", release, "-o", "json").stdout)["data"]
        local_bundle = tmp_path / "ca.crt"
        local_bundle.write_text(bundle)
        operator.stop()
        operator.env = {**{k: v for k, v in saved_env.items() if not k.startswith("PRIVATEFM_")},
                        **config, "PRIVATEFM_HTTP_PORT": str(operator.port),
                        "PRIVATEFM_LEASE_NAMESPACE": system,  # the Pod's own namespace: it holds its Lease
                        "PRIVATEFM_S3_ACCESS_KEY": s3.operator.access_key,
                        "PRIVATEFM_S3_SECRET_KEY": s3.operator.secret_key,
                        "AWS_CA_BUNDLE": str(local_bundle)}
        operator.start()

        name = f"learner-{uid}"
        body = yaml.safe_load((MANIFESTS / "samples" / "learnernamespace-minimal.yaml").read_text())
        body["metadata"]["name"], body["spec"]["learnerId"], body["spec"]["deletionDelay"] = name, f"h{uid}", "2s"
        kube.kubectl("apply", "-f", "-", input=json.dumps(body))
        kube.kubectl("wait", "--for=condition=Ready", f"lns/{name}", "--timeout=90s")
        status = json.loads(kube.kubectl("get", "lns", name, "-o", "json").stdout)["status"]
        learner_ns = status["namespace"]
        try:
            kube.kubectl("-n", learner_ns, "create", "configmap", ca, f"--from-file=ca.crt={certifi.where()}")
            seed.publish_adapter(s3.client(), s3.bucket, status["nsUid"], 1, seed=1)
            merge = yaml.safe_load((MANIFESTS / "samples" / "adaptermerge.yaml").read_text())
            kube.kubectl("-n", learner_ns, "create", "-f", "-", input=json.dumps(merge))
            kube.kubectl("-n", learner_ns, "wait", "--for=jsonpath={.status.phase}=Succeeded",
                         f"am/{merge['metadata']['name']}", "--timeout=180s")
            job = json.loads(kube.kubectl("-n", learner_ns, "get", "job", merge["metadata"]["name"],
                                          "-o", "json").stdout)
            pod = job["spec"]["template"]["spec"]
            volume = next(v for v in pod["volumes"] if v["name"] == "ca-bundle")["configMap"]
            assert (volume["name"], volume["items"]) == (ca, [{"key": "ca.crt", "path": "ca.crt"}])
            assert {"name": "AWS_CA_BUNDLE", "value": "/etc/privatefm/ca/ca.crt"} in pod["containers"][0]["env"]
            lns = json.loads(kube.kubectl("get", "lns", name, "-o", "json").stdout)
            assert lns["status"]["currentCheckpoint"]["version"] == 1
        finally:
            kube.kubectl("delete", "lns", name, "--wait=false", check=False)
            kube.kubectl("annotate", "--overwrite", "lns", name, f"privatefm.io/deletion-approved-by={GUARDIAN}",
                         f"--as={GUARDIAN}", "--as-group=system:authenticated", check=False)
    finally:
        operator.stop()
        operator.env = saved_env
        operator.start()
        # Hand the objects back to manifests/ for the rest of the session: forget the release (its
        # storage Secret) without deleting what it owns, then re-apply the shipped RBAC and policies.
        kube.kubectl("-n", system, "delete", "secret", "-l", f"owner=helm,name={release}", check=False)
        for path in ("rbac.yaml", "admission.yaml"):
            kube.kubectl("apply", "-f", str(MANIFESTS / path))
        kube.kubectl("-n", system, "delete", "secret", secret, check=False)
        kube.kubectl("-n", system, "delete", "configmap", ca, check=False)
