"""Pure builders of every object the operator keeps true. No I/O: input in, manifests out.

The merge Job's parameters travel as pod-template annotations that the container reads through
the downward API. That lets a CronJob create its Jobs *suspended* with a fixed template; the
operator then assigns the version, writes the parameters into the (still mutable) template
annotations, writes the run's own store credentials into a Secret owned by the Job, and
un-suspends it. A manual run's Job is built the same way, created suspended with the
annotations already set. The pod itself never talks to the Kubernetes API.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from privatefm_merge import contract

from privatefm_operator import naming, schedules
from privatefm_operator.api import LearnerNamespaceSpec, MergeSettings, MergeTrigger
from privatefm_operator.settings import Settings

PARAM_PREFIX = "merge.privatefm.io/"
# The deep check: a verify Job rehashes one checkpoint on CPU with read-only store credentials.
VERIFY_COMPONENT = "verify"
VERIFY_CPU = "1"                       # hashing is one stream per file, a few at a time
VERIFY_MEMORY = "512Mi"                # constant memory: a few read buffers, whatever the checkpoint's size
VERIFY_DEADLINE_SECONDS = 2 * 3600     # ~14 GB (a 7B bf16 checkpoint) at 100 MB/s is under 3 minutes
VERIFY_TTL_SECONDS = 7 * 86400         # a finished Job (and its Secret) stays a week for its outcome
RESULT_PATH = contract.DEFAULT_RESULT_PATH
# Contract variable -> pod annotation it is read from.
PARAM_ANNOTATIONS = {
    env: PARAM_PREFIX + env.removeprefix("PRIVATEFM_").lower().replace("_", "-")
    for env in (contract.ENV_BASE_URI, contract.ENV_ADAPTERS, contract.ENV_OUTPUT_URI,
                contract.ENV_BASE_MODEL, contract.ENV_BASE_VERSION, contract.ENV_PARENT_VERSION,
                contract.ENV_TARGET_VERSION)
}


@dataclass(frozen=True)
class Learner:
    """What the builders need to know about one LearnerNamespace."""

    name: str
    ns_uid: str
    namespace: str
    spec: LearnerNamespaceSpec

    @property
    def labels(self) -> dict[str, str]:
        return naming.learner_labels(self.name, self.spec.learner_id, self.ns_uid)


def _meta(learner: Learner, name: str, component: str) -> dict[str, Any]:
    """No ownerReference to the CR: deleting it (or its CRD) must never cascade through a learner's
    isolation; the operator keeps these by server-side apply and adopts them again."""
    return {"name": name, "namespace": learner.namespace,
            "labels": {**learner.labels, naming.LABEL_COMPONENT: component}}


def namespace(learner: Learner) -> dict[str, Any]:
    """The learner's namespace: labelled, Pod Security `restricted`, and deliberately not owned by the CR."""
    return {
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": learner.namespace, "labels": {
            **learner.labels,
            "pod-security.kubernetes.io/enforce": "restricted",
            "pod-security.kubernetes.io/enforce-version": "latest",
            "pod-security.kubernetes.io/warn": "restricted",
            "pod-security.kubernetes.io/audit": "restricted",
        }},
    }


def s3_egress(endpoint: str, cidr_override: str) -> dict[str, Any]:
    """Egress to the S3 endpoint: its IP as a /32 (or the configured CIDR), on its port."""
    url = urlparse(endpoint or "https://s3.amazonaws.com")
    port = url.port or (443 if url.scheme == "https" else 80)
    rule: dict[str, Any] = {"ports": [{"protocol": "TCP", "port": port}]}
    cidr = cidr_override
    if not cidr and url.hostname:
        try:
            ip = ipaddress.ip_address(url.hostname)
            cidr = f"{ip}/{32 if ip.version == 4 else 128}"
        except ValueError:
            cidr = ""  # a host name: NetworkPolicy cannot name hosts, so only the port is restricted
    if cidr:
        rule["to"] = [{"ipBlock": {"cidr": cidr}}]
    return rule


def network_policy(learner: Learner, settings: Settings) -> dict[str, Any]:
    """Default deny in and out, except DNS and the S3 endpoint."""
    dns = {"to": [{"namespaceSelector": {}}],
           "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": _meta(learner, naming.NETWORK_POLICY, "isolation"),
        # No ingress rules at all: with Ingress in policyTypes that denies all ingress. (An explicit
        # "ingress": [] is dropped by the API server, so every apply would change the object again.)
        "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"],
                 "egress": [dns, s3_egress(settings.s3_endpoint, settings.s3_egress_cidr)]},
    }


def gpus(merge: MergeSettings, settings: Settings) -> int:
    return merge.gpus if "gpus" in merge.model_fields_set else settings.merge_gpus


def resource_quota(learner: Learner, settings: Settings) -> dict[str, Any]:
    merge = learner.spec.merge_settings()
    return {
        "apiVersion": "v1", "kind": "ResourceQuota",
        "metadata": _meta(learner, naming.RESOURCE_QUOTA, "quota"),
        "spec": {"hard": {
            "pods": str(settings.quota_pods),
            "requests.cpu": settings.quota_cpu,
            "requests.memory": settings.quota_memory,
            "limits.memory": settings.quota_memory,
            "requests.nvidia.com/gpu": str(gpus(merge, settings)),
        }},
    }


def limit_range(learner: Learner, settings: Settings) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "LimitRange",
        "metadata": _meta(learner, naming.LIMIT_RANGE, "quota"),
        "spec": {"limits": [{
            "type": "Container",
            "default": {"cpu": settings.merge_cpu, "memory": settings.merge_memory},
            "defaultRequest": {"cpu": settings.merge_cpu, "memory": settings.merge_memory},
        }]},
    }


def service_account(learner: Learner) -> dict[str, Any]:
    """The merge pods' identity: no token, no RoleBinding, so no Kubernetes API rights."""
    return {"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": _meta(learner, naming.MERGE_SERVICE_ACCOUNT, "merge"),
            "automountServiceAccountToken": False}


def run_secret(learner: Learner, name: str, job: dict[str, Any], store_env: dict[str, str],
               component: str = "merge") -> dict[str, Any]:
    """One run's (or verify Job's) store credentials, owned by its Job: garbage collection removes
    them with it."""
    owner = {"apiVersion": "batch/v1", "kind": "Job", "name": job["metadata"]["name"],
             "uid": job["metadata"]["uid"], "controller": False, "blockOwnerDeletion": False}
    return {
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {**_meta(learner, name, component), "ownerReferences": [owner]},
        "stringData": store_env,
    }


def _resources(merge: MergeSettings, settings: Settings) -> dict[str, Any]:
    requests: dict[str, Any] = {"cpu": settings.merge_cpu, "memory": settings.merge_memory}
    limits: dict[str, Any] = {"memory": settings.merge_memory}
    if merge.resources:
        requests.update(merge.resources.requests or {})
        limits.update(merge.resources.limits or {})
    n = gpus(merge, settings)
    if n:
        limits["nvidia.com/gpu"] = str(n)  # extended resources: the request defaults to the limit
    return {"requests": requests, "limits": limits}


def _security_context(settings: Settings) -> dict[str, Any]:
    """Pod Security ``restricted``, as the learner's namespace enforces: the pod's part."""
    return {"runAsNonRoot": True, "runAsUser": settings.merge_run_as_user,
            "runAsGroup": settings.merge_run_as_user, "fsGroup": settings.merge_run_as_user,
            "seccompProfile": {"type": "RuntimeDefault"}}


def _container_security() -> dict[str, Any]:
    """... and the container's part."""
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True}


CA_BUNDLE_VOLUME = "ca-bundle"
CA_BUNDLE_DIR = "/etc/privatefm/ca"


def with_ca_bundle(pod_spec: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Mounts the store's CA bundle (settings.ca_bundle_configmap, a ConfigMap in the pod's namespace)
    into every container and points AWS_CA_BUNDLE at it; unchanged when no bundle is set."""
    if not settings.ca_bundle_configmap:
        return pod_spec
    pod_spec["volumes"].append({"name": CA_BUNDLE_VOLUME, "configMap": {
        "name": settings.ca_bundle_configmap, "items": [{"key": settings.ca_bundle_key, "path": "ca.crt"}]}})
    for container in pod_spec["containers"]:
        container["volumeMounts"].append({"name": CA_BUNDLE_VOLUME, "mountPath": CA_BUNDLE_DIR, "readOnly": True})
        container["env"].append({"name": "AWS_CA_BUNDLE", "value": f"{CA_BUNDLE_DIR}/ca.crt"})
    return pod_spec


def merge_pod_template(learner: Learner, settings: Settings, trigger: MergeTrigger,
                       params: dict[str, str] | None, secret: str) -> dict[str, Any]:
    """The merge pod: no API token, restricted, its run's store credentials from ``secret``."""
    merge = learner.spec.merge_settings()
    env: list[dict[str, Any]] = [
        {"name": var, "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{key}']"}}}
        for var, key in PARAM_ANNOTATIONS.items()
    ]
    env += [
        {"name": contract.ENV_RESULT_PATH, "value": RESULT_PATH},
        {"name": contract.ENV_DEVICE, "value": "cuda" if gpus(merge, settings) else "cpu"},
        {"name": "HOME", "value": "/tmp"},
        {"name": "TMPDIR", "value": "/tmp"},
    ]
    labels = {**learner.labels, naming.LABEL_COMPONENT: "merge", naming.LABEL_TRIGGER: trigger.value}
    spec: dict[str, Any] = {
        "serviceAccountName": naming.MERGE_SERVICE_ACCOUNT,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "restartPolicy": "Never",
        "securityContext": _security_context(settings),
        "containers": [{
            "name": "merge",
            "image": settings.merge_image,
            "imagePullPolicy": settings.merge_image_pull_policy,
            "command": list(contract.POD_COMMAND),
            "env": env,
            "envFrom": [{"secretRef": {"name": secret}}],
            "resources": _resources(merge, settings),
            "securityContext": _container_security(),
            "terminationMessagePath": RESULT_PATH,
            "terminationMessagePolicy": "File",
            "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
        }],
        "volumes": [{"name": "tmp", "emptyDir": {}}],
    }
    if merge.node_selector:
        spec["nodeSelector"] = dict(merge.node_selector)
    if merge.tolerations:
        spec["tolerations"] = [t.wire() for t in merge.tolerations]
    with_ca_bundle(spec, settings)
    meta: dict[str, Any] = {"labels": labels}
    if params:
        meta["annotations"] = params
    return {"metadata": meta, "spec": spec}


def merge_job_spec(learner: Learner, settings: Settings, trigger: MergeTrigger,
                   params: dict[str, str] | None, secret: str) -> dict[str, Any]:
    """Every merge Job starts suspended: the operator un-suspends it once the run's credentials exist."""
    return {
        "backoffLimit": 0,  # the AdapterMerge is the unit of retry, not the pod
        "activeDeadlineSeconds": settings.merge_deadline_seconds,
        "suspend": True,
        "template": merge_pod_template(learner, settings, trigger, params, secret),
    }


def merge_job(learner: Learner, settings: Settings, name: str, trigger: MergeTrigger,
              params: dict[str, str], owner: dict[str, Any]) -> dict[str, Any]:
    """The Job of a manual run, owned by its AdapterMerge."""
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name, "namespace": learner.namespace,
                     "labels": {**learner.labels, naming.LABEL_COMPONENT: "merge",
                                naming.LABEL_TRIGGER: trigger.value},
                     "ownerReferences": [owner]},
        "spec": merge_job_spec(learner, settings, trigger, params, naming.run_secret(name)),
    }


def verify_command(uri: str) -> list[str]:
    return ["privatefm-merge", "verify", uri, "--json", "--result-path", RESULT_PATH]


def verify_job(learner: Learner, settings: Settings, name: str, version: int, uri: str,
               secret_name: str) -> dict[str, Any]:
    """The deep check of checkpoint ``version`` at ``uri``: the merge image rehashes every file
    against its manifest and reports a ``VerifyResult`` in its termination message.

    On CPU: no GPU, and the merge settings' node selector and tolerations (GPU nodes) are not
    used; ``NVIDIA_VISIBLE_DEVICES=void`` keeps a node whose default runtime is NVIDIA's from
    handing the (CUDA) image every GPU anyway. Like a merge pod it has no API token and runs
    restricted; its store credentials (read-only, that one checkpoint) come from ``secret_name``,
    a Secret owned by the Job. Created suspended, like merge Jobs: started once that Secret
    exists. No ownerReference: nothing in a learner's namespace hangs off the CR.
    """
    labels = {**learner.labels, naming.LABEL_COMPONENT: VERIFY_COMPONENT, naming.LABEL_VERSION: str(version)}
    container = {
        "name": "verify",
        "image": settings.merge_image,
        "imagePullPolicy": settings.merge_image_pull_policy,
        "command": verify_command(uri),
        "env": [{"name": "HOME", "value": "/tmp"}, {"name": "TMPDIR", "value": "/tmp"},
                {"name": "NVIDIA_VISIBLE_DEVICES", "value": "void"}, {"name": "CUDA_VISIBLE_DEVICES", "value": ""}],
        "envFrom": [{"secretRef": {"name": secret_name}}],
        # No nvidia.com/gpu: the check runs on CPU. The CPU limit is explicit: without it the learner's
        # LimitRange would give its default (the merge's CPU), and a request above that limit makes
        # every pod of the Job invalid (found on the real node with merge CPU 250m).
        "resources": {"requests": {"cpu": VERIFY_CPU, "memory": VERIFY_MEMORY},
                      "limits": {"cpu": VERIFY_CPU, "memory": VERIFY_MEMORY}},
        "securityContext": _container_security(),
        "terminationMessagePath": RESULT_PATH,
        "terminationMessagePolicy": "File",
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    pod: dict[str, Any] = {
        "metadata": {"labels": labels},
        "spec": {
            "serviceAccountName": naming.MERGE_SERVICE_ACCOUNT,
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "restartPolicy": "Never",
            "securityContext": _security_context(settings),
            "containers": [container],
            "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}],
        },
    }
    with_ca_bundle(pod["spec"], settings)
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name, "namespace": learner.namespace, "labels": labels},
        "spec": {
            "backoffLimit": 0,  # a failed check is a result; the caller decides whether to try again
            "activeDeadlineSeconds": VERIFY_DEADLINE_SECONDS,
            "ttlSecondsAfterFinished": VERIFY_TTL_SECONDS,
            "suspend": True,
            "template": pod,
        },
    }


def merge_schedule(learner: Learner, settings: Settings) -> str:
    """The learner's nightly schedule in effect (``schedules``: H fields, the default window)."""
    return schedules.effective(learner.spec.merge_settings().schedule, learner.spec.learner_id,
                               settings.schedule_window)


def cronjob(learner: Learner, settings: Settings) -> dict[str, Any]:
    """The nightly schedule. Its Jobs start suspended until the operator assigns their version."""
    merge = learner.spec.merge_settings()
    spec: dict[str, Any] = {
        "schedule": merge_schedule(learner, settings),
        "suspend": merge.suspend,
        "concurrencyPolicy": "Forbid",
        "startingDeadlineSeconds": 3600,
        "successfulJobsHistoryLimit": settings.job_history,
        "failedJobsHistoryLimit": settings.job_history,
        "jobTemplate": {
            "metadata": {"labels": {**learner.labels, naming.LABEL_COMPONENT: "merge",
                                    naming.LABEL_TRIGGER: MergeTrigger.SCHEDULED.value}},
            "spec": merge_job_spec(learner, settings, MergeTrigger.SCHEDULED, None, naming.SCHEDULED_RUN_SECRET),
        },
    }
    if merge.time_zone:
        spec["timeZone"] = merge.time_zone
    return {"apiVersion": "batch/v1", "kind": "CronJob",
            "metadata": _meta(learner, naming.CRONJOB, "schedule"), "spec": spec}


def local_queue(learner: Learner, settings: Settings) -> dict[str, Any]:
    """With Kueue: the learner's LocalQueue, backed by the cluster's ClusterQueue for merges."""
    return {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "LocalQueue",
            "metadata": _meta(learner, settings.kueue_queue_name, "queue"),
            "spec": {"clusterQueue": settings.kueue_cluster_queue}}


def children(learner: Learner, settings: Settings) -> list[dict[str, Any]]:
    """Everything inside the learner's namespace, in apply order."""
    return [
        service_account(learner),
        network_policy(learner, settings),
        resource_quota(learner, settings),
        limit_range(learner, settings),
        cronjob(learner, settings),
        *([local_queue(learner, settings)] if settings.kueue_cluster_queue else []),
    ]


def job_params(job_env: contract.MergeJob) -> dict[str, str]:
    """The pod annotations that carry one run's contract variables."""
    env = job_env.to_env()
    return {key: env.get(var, "") for var, key in PARAM_ANNOTATIONS.items()}
