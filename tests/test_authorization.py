"""Who may do what: the authorization matrix, on a real API server with the shipped RBAC and admission.

manifests/rbac.yaml gives the operator only the verbs it calls; manifests/admission.yaml confines where
it may write (ValidatingAdmissionPolicy) and reserves LearnerNamespace and AdapterMerge status to it;
manifests/learner-role.yaml is what a learner gets in their own namespace. ``MATRIX`` below is the
whole expectation, one cell per (request, identity), and every cell is checked: allowed, denied by
RBAC, or denied by a named policy with its message. docs/security.md shows the same table
(``markdown_matrix()``, checked by a test).

The requests are the operator's own: merge patches, server-side applies, creates and deletes, sent
raw (no kubectl GET first), as the identities they name (impersonation). Writes are dry runs
(``dryRun=All``; admission still runs), except the setup.
"""

from __future__ import annotations

import base64
import functools
import http.client
import json
import ssl
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from privatefm_operator import naming
from privatefm_testing.cluster import BIN
from privatefm_testing.kube import Kube, wait_for

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = REPO / "manifests"
CHART = REPO / "charts" / "privatefm-operator"
DOC = REPO / "docs" / "security.md"

OPERATOR = "system:serviceaccount:privatefm-system:privatefm-operator"
SA_GROUPS = ("system:serviceaccounts", "system:authenticated")
MANAGED = {naming.LABEL_MANAGED_BY: naming.MANAGED_BY}
POLICIES = ("privatefm-operator-confinement", "privatefm-operator-status-writers",
            "privatefm-operator-nsuid-immutable", "privatefm-operator-guardian-approval",
            "privatefm-operator-namespace-deletion", "privatefm-operator-scheduled-merges")
PEOPLE_ROLES = ("privatefm-learner", "privatefm-learner-admin", "privatefm-guardian")
APPROVAL = naming.APPROVAL_ANNOTATION
FINALIZER = "privatefm.io/guardian"
GUARDIAN_USER, GUARDIAN_GROUP, GROUP_MEMBER = "parent-of-x", "school-admins", "teacher-1"
SAMPLE_GUARDIAN = "parent-of-bo"  # manifests/samples/learnernamespace-minimal.yaml


# ---- identities ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Who:
    key: str
    title: str
    user: str | None  # None: the harness's own cluster admin, not impersonated
    groups: tuple[str, ...] = ()


WHO = (
    Who("operator", "operator SA", OPERATOR, ("system:serviceaccounts:privatefm-system", *SA_GROUPS)),
    # The same ServiceAccount with the RBAC it shipped with before (cluster admin, in effect): what
    # the admission policies alone hold back.
    Who("operator-admin", "operator SA if its RBAC were cluster-admin", OPERATOR,
        ("system:serviceaccounts:privatefm-system", *SA_GROUPS, "system:masters")),
    Who("merge", "merge SA (learner A)", "system:serviceaccount:{a}:privatefm-merge",
        ("system:serviceaccounts:{a}", *SA_GROUPS)),
    Who("learner-a", "learner A", "learner-a@learners.test", ("system:authenticated",)),
    Who("learner-b", "learner B", "learner-b@learners.test", ("system:authenticated",)),
    Who("app-admin", "other-app admin", "admin@other-app.test", ("system:authenticated",)),
    # Both bound to privatefm-guardian; the fixture's learner lists the one as a User guardian, the
    # other's group as a Group guardian. The "fresh" learner lists neither.
    Who("guardian-user", "guardian User", GUARDIAN_USER, ("system:authenticated",)),
    Who("guardian-group", "guardian Group member", GROUP_MEMBER, (GUARDIAN_GROUP, "system:authenticated")),
    Who("cluster-admin", "cluster admin", None),
    Who("anonymous", "anonymous", "system:anonymous", ("system:unauthenticated",)),
)

# ---- outcomes --------------------------------------------------------------------------------
ALLOWED, RBAC = "allowed", "rbac"
# code -> (policy, what its message says, how the table shows it)
DENIALS: dict[str, tuple[str, str, str]] = {
    "ns-create": ("privatefm-operator-confinement",
                  "the privatefm operator may only create namespaces labelled "
                  "app.kubernetes.io/managed-by=privatefm-operator", "policy: unlabelled namespace"),
    "ns-unmanaged": ("privatefm-operator-confinement",
                     "the privatefm operator may only change or delete namespaces that already carry "
                     "app.kubernetes.io/managed-by=privatefm-operator", "policy: not a managed namespace"),
    "ns-unlabel": ("privatefm-operator-confinement",
                   "the privatefm operator may not remove app.kubernetes.io/managed-by=privatefm-operator",
                   "policy: label removal"),
    "outside": ("privatefm-operator-confinement",
                "the privatefm operator may only write inside namespaces labelled "
                "app.kubernetes.io/managed-by=privatefm-operator", "policy: outside managed namespaces"),
    "status": ("privatefm-operator-status-writers",
               f"only the privatefm operator ({OPERATOR}) may write the status of LearnerNamespaces and "
               "AdapterMerges", "policy: status writer"),
    "nsuid": ("privatefm-operator-nsuid-immutable", "status.nsUid of a LearnerNamespace is immutable once set",
              "policy: nsUid immutable"),
    "not-guardian": ("privatefm-operator-guardian-approval",
                     f"only a guardian listed in spec.guardians may set, change or remove {APPROVAL}",
                     "policy: not a listed guardian"),
    "not-self": ("privatefm-operator-guardian-approval",
                 f"{APPROVAL} must name the approving guardian's own username", "policy: approval in another's name"),
    "guardian-only": ("privatefm-operator-guardian-approval",
                      f"a guardian may only set or remove {APPROVAL} on a LearnerNamespace",
                      "policy: guardian changes only the approval"),
    "finalizer": ("privatefm-operator-guardian-approval",
                  f"only the privatefm operator ({OPERATOR}) may remove the finalizer {FINALIZER}",
                  "policy: guardian finalizer"),
    "preapproved": ("privatefm-operator-guardian-approval",
                    f"a LearnerNamespace may not be created with {APPROVAL}", "policy: created approved"),
    "ns-delete": ("privatefm-operator-namespace-deletion",
                  f"only the privatefm operator ({OPERATOR}) may delete a learner namespace",
                  "policy: learner namespace deletion"),
    "scheduled": ("privatefm-operator-scheduled-merges",
                  f"only the privatefm operator ({OPERATOR}) may create AdapterMerges with spec.trigger Scheduled",
                  "policy: Scheduled trigger"),
}
# Two policies refuse it; the API server reports whichever it evaluated first.
EITHER_STATUS_OR_NSUID = "status|nsuid"
SHOWN = {ALLOWED: "**allowed**", RBAC: "RBAC", EITHER_STATUS_OR_NSUID: "policy: status writer / nsUid immutable",
         **{code: shown for code, (_p, _m, shown) in DENIALS.items()}}


# ---- the matrix ------------------------------------------------------------------------------
JOB = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "authz-{uid}"},
       "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [
           {"name": "c", "image": "busybox", "command": ["true"]}]}}}}
APPLY = "?fieldManager=privatefm-operator&force=true"
AM_PATH = "/apis/privatefm.io/v1alpha1/namespaces/{a}/adaptermerges"
LNS_PATH = "/apis/privatefm.io/v1alpha1/learnernamespaces"
LEASES_PATH = "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases"
LEASE = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "spec": {"holderIdentity": "authz"}}
OPERATOR_ONLY = ("operator", "operator-admin", "cluster-admin")  # the identities a row's "everyone" means
GUARDIANS = ("guardian-user", "guardian-group")
MERGE_PATCH = "application/merge-patch+json"


@dataclass(frozen=True)
class Row:
    title: str
    method: str
    path: str
    body: Any = None
    content_type: str = "application/json"
    dry_run: bool = True
    expect: Mapping[str, str] = field(default_factory=dict)  # identity key -> outcome; RBAC if absent

    def outcome(self, who: str) -> str:
        return self.expect.get(who, RBAC)


def _all(outcome: str, *keys: str) -> dict[str, str]:
    return dict.fromkeys(keys or OPERATOR_ONLY, outcome)


MATRIX: tuple[Row, ...] = (
    # -- Secrets: the operator only ever writes them (server-side apply), never reads them.
    Row("read a Secret in kube-system", "GET", "/api/v1/namespaces/kube-system/secrets/authz-{uid}",
        dry_run=False, expect=_all(ALLOWED, "operator-admin", "cluster-admin")),
    Row("list the Secrets of other-app", "GET", "/api/v1/namespaces/{app}/secrets", dry_run=False,
        expect=_all(ALLOWED, "operator-admin", "cluster-admin", "app-admin")),
    Row("read a Secret in learner A's namespace", "GET", "/api/v1/namespaces/{a}/secrets/authz-{uid}",
        dry_run=False, expect=_all(ALLOWED, "operator-admin", "cluster-admin")),
    Row("apply a label to a Secret in kube-system (the reply would carry its data)", "PATCH",
        "/api/v1/namespaces/kube-system/secrets/authz-{uid}" + APPLY,
        {"apiVersion": "v1", "kind": "Secret",
         "metadata": {"name": "authz-{uid}", "namespace": "kube-system", "labels": {"probe": "x"}}},
        "application/apply-patch+yaml", expect={**_all("outside"), "cluster-admin": ALLOWED}),
    Row("apply a run's Secret in learner A's namespace (creates it)", "PATCH",
        "/api/v1/namespaces/{a}/secrets/privatefm-run.authz" + APPLY,
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "privatefm-run.authz", "namespace": "{a}"},
         "stringData": {"AWS_ACCESS_KEY_ID": "x"}},
        "application/apply-patch+yaml", expect=_all(ALLOWED)),
    # -- Namespaces: only ones labelled managed-by, and the label can be neither added nor removed.
    Row("relabel kube-system to Pod Security privileged", "PATCH", "/api/v1/namespaces/kube-system",
        {"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "privileged"}}},
        "application/merge-patch+json", expect={**_all("ns-unmanaged"), "cluster-admin": ALLOWED}),
    Row("add the managed-by label to other-app's namespace", "PATCH", "/api/v1/namespaces/{app}",
        {"metadata": {"labels": MANAGED}}, "application/merge-patch+json",
        expect={**_all("ns-unmanaged"), "cluster-admin": ALLOWED}),
    Row("remove the managed-by label from learner A's namespace", "PATCH", "/api/v1/namespaces/{a}",
        {"metadata": {"labels": {naming.LABEL_MANAGED_BY: None}}}, "application/merge-patch+json",
        expect={**_all("ns-unlabel"), "cluster-admin": ALLOWED}),
    Row("create a namespace without the managed-by label", "POST", "/api/v1/namespaces",
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "authz-plain-{uid}"}},
        expect={**_all("ns-create"), "cluster-admin": ALLOWED}),
    Row("apply a new namespace labelled managed-by", "PATCH", "/api/v1/namespaces/lrn-authz-new-{uid}" + APPLY,
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "lrn-authz-new-{uid}", "labels": MANAGED}},
        "application/apply-patch+yaml", expect=_all(ALLOWED)),
    Row("delete learner A's namespace (after a guardian's approval)", "DELETE", "/api/v1/namespaces/{a}",
        expect={**_all(ALLOWED), "cluster-admin": "ns-delete"}),
    Row("delete other-app's namespace", "DELETE", "/api/v1/namespaces/{app}",
        expect={**_all("ns-unmanaged"), "cluster-admin": ALLOWED}),
    # -- Everything else outside learner namespaces.
    Row("create a ServiceAccount in kube-system", "POST", "/api/v1/namespaces/kube-system/serviceaccounts",
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "authz-{uid}"}},
        expect={**_all("outside"), "cluster-admin": ALLOWED}),
    Row("create a Job in kube-system", "POST", "/apis/batch/v1/namespaces/kube-system/jobs", JOB,
        expect={**_all("outside"), "cluster-admin": ALLOWED}),
    Row("create a Job in other-app", "POST", "/apis/batch/v1/namespaces/{app}/jobs", JOB,
        expect={**_all("outside"), "cluster-admin": ALLOWED, "app-admin": ALLOWED}),
    Row("create a Job in learner A's namespace", "POST", "/apis/batch/v1/namespaces/{a}/jobs", JOB,
        expect=_all(ALLOWED)),
    Row("delete a Job in learner A's namespace (a verify Job)", "DELETE",
        "/apis/batch/v1/namespaces/{a}/jobs/authz-del-{uid}", expect=_all(ALLOWED)),
    Row("delete a Job in kube-system", "DELETE", "/apis/batch/v1/namespaces/kube-system/jobs/authz-del-{uid}",
        expect={**_all("outside"), "cluster-admin": ALLOWED}),
    Row("bind `admin` in learner A's namespace (RoleBinding)", "POST",
        "/apis/rbac.authorization.k8s.io/v1/namespaces/{a}/rolebindings",
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "authz-{uid}"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "admin"},
         "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "mallory"}]},
        expect=_all(ALLOWED, "operator-admin", "cluster-admin")),
    Row("bind `cluster-admin` (ClusterRoleBinding)", "POST",
        "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "authz-{uid}"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
         "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "mallory"}]},
        expect={"operator-admin": "outside", "cluster-admin": ALLOWED}),
    # -- The shards' Leases: its own, in its own namespace; no other Lease anywhere.
    Row("create a shard's Lease in the operator's namespace", "POST", LEASES_PATH.format(ns="privatefm-system"),
        {**LEASE, "metadata": {"name": "privatefm-operator-shard-authz{uid}"}}, expect=_all(ALLOWED)),
    Row("create another Lease in the operator's namespace", "POST", LEASES_PATH.format(ns="privatefm-system"),
        {**LEASE, "metadata": {"name": "authz-{uid}"}},
        expect={**_all("outside"), "cluster-admin": ALLOWED}),
    Row("create a shard-named Lease in kube-system", "POST", LEASES_PATH.format(ns="kube-system"),
        {**LEASE, "metadata": {"name": "privatefm-operator-shard-authz{uid}"}},
        expect={"operator-admin": "outside", "cluster-admin": ALLOWED}),
    Row("list the Leases in kube-system (others' leader elections)", "GET", LEASES_PATH.format(ns="kube-system"),
        dry_run=False, expect=_all(ALLOWED, "operator-admin", "cluster-admin")),
    # -- Events: about the operator's own kinds, wherever they are; nothing else outside.
    Row("post an Event about a LearnerNamespace in default", "POST", "/api/v1/namespaces/default/events",
        {"apiVersion": "v1", "kind": "Event", "metadata": {"generateName": "authz."}, "type": "Normal",
         "reason": "NamespaceCreated", "message": "m",
         "involvedObject": {"apiVersion": "privatefm.io/v1alpha1", "kind": "LearnerNamespace", "name": "{lns}"}},
        expect=_all(ALLOWED)),
    Row("post an Event about a Pod in kube-system", "POST", "/api/v1/namespaces/kube-system/events",
        {"apiVersion": "v1", "kind": "Event", "metadata": {"generateName": "authz."}, "type": "Normal",
         "reason": "Pulled", "message": "m",
         "involvedObject": {"apiVersion": "v1", "kind": "Pod", "name": "x", "namespace": "kube-system"}},
        expect={**_all("outside"), "cluster-admin": ALLOWED}),
    # -- Status: the operator's alone, and nsUid never changes once set.
    Row("patch the status of an AdapterMerge", "PATCH", AM_PATH + "/am-{uid}/status",
        {"status": {"phase": "Running"}}, "application/merge-patch+json",
        expect={**_all(ALLOWED), "cluster-admin": "status"}),
    Row("patch the status of a LearnerNamespace", "PATCH", LNS_PATH + "/{lns}/status",
        {"status": {"phase": "Ready"}}, "application/merge-patch+json",
        expect={**_all(ALLOWED), "cluster-admin": "status"}),
    Row("set status.nsUid of a LearnerNamespace that has none", "PATCH", LNS_PATH + "/{fresh}/status",
        {"status": {"nsUid": "{fresh_uid}"}}, "application/merge-patch+json",
        expect={**_all(ALLOWED), "cluster-admin": "status"}),
    Row("change status.nsUid of a LearnerNamespace", "PATCH", LNS_PATH + "/{lns}/status",
        {"status": {"nsUid": "0123456789ab"}}, "application/merge-patch+json",
        expect={**_all("nsuid"), "cluster-admin": EITHER_STATUS_OR_NSUID}),
    # -- AdapterMerges: a learner sees and requests runs in their own namespace only.
    Row("create an AdapterMerge in learner A's namespace", "POST", AM_PATH,
        {"apiVersion": "privatefm.io/v1alpha1", "kind": "AdapterMerge", "metadata": {"name": "manual-{uid}"},
         "spec": {"trigger": "Manual"}},
        expect=_all(ALLOWED, *OPERATOR_ONLY, "learner-a")),
    Row("create a Scheduled AdapterMerge in learner A's namespace", "POST", AM_PATH,
        {"apiVersion": "privatefm.io/v1alpha1", "kind": "AdapterMerge", "metadata": {"name": "sched-{uid}"},
         "spec": {"trigger": "Scheduled"}},
        expect={**_all(ALLOWED, "operator", "operator-admin"), **_all("scheduled", "cluster-admin", "learner-a")}),
    Row("list the AdapterMerges in learner A's namespace", "GET", AM_PATH, dry_run=False,
        expect=_all(ALLOWED, *OPERATOR_ONLY, "learner-a")),
    Row("delete an AdapterMerge in learner A's namespace", "DELETE", AM_PATH + "/am-{uid}",
        expect=_all(ALLOWED, "operator-admin", "cluster-admin")),
    Row("create a LearnerNamespace", "POST", LNS_PATH, "{new_lns}",
        expect=_all(ALLOWED, "operator-admin", "cluster-admin")),
    # -- Guardian-approved deletion: the approval is a listed guardian's, in their own name, and a
    #    guardian changes nothing else; only the operator removes the finalizer (admins: break-glass).
    Row("approve a learner's deletion in one's own name", "PATCH", LNS_PATH + "/{lns}",
        {"metadata": {"annotations": {APPROVAL: "{me}"}}}, MERGE_PATCH,
        expect={**_all("not-guardian"), **_all(ALLOWED, *GUARDIANS)}),
    Row("approve a learner's deletion in someone else's name", "PATCH", LNS_PATH + "/{lns}",
        {"metadata": {"annotations": {APPROVAL: SAMPLE_GUARDIAN}}}, MERGE_PATCH,
        expect={**_all("not-guardian"), **_all("not-self", *GUARDIANS)}),
    Row("approve the deletion of a learner that does not list them", "PATCH", LNS_PATH + "/{fresh}",
        {"metadata": {"annotations": {APPROVAL: "{me}"}}}, MERGE_PATCH,
        expect=_all("not-guardian", *OPERATOR_ONLY, *GUARDIANS)),
    Row("revoke an approval on a learner that does not list them", "PATCH", LNS_PATH + "/{approved}",
        {"metadata": {"annotations": {APPROVAL: None}}}, MERGE_PATCH,
        expect=_all("not-guardian", *OPERATOR_ONLY, *GUARDIANS)),
    Row("patch a learner's spec (deletionDelay)", "PATCH", LNS_PATH + "/{lns}",
        {"spec": {"deletionDelay": "1s"}}, MERGE_PATCH,
        expect={**_all(ALLOWED), **_all("guardian-only", *GUARDIANS)}),
    Row("label a learner", "PATCH", LNS_PATH + "/{lns}",
        {"metadata": {"labels": {"probe": "x"}}}, MERGE_PATCH,
        expect={**_all(ALLOWED), **_all("guardian-only", *GUARDIANS)}),
    Row("create a LearnerNamespace already approved", "POST", LNS_PATH, "{preapproved_lns}",
        expect=_all("preapproved", "operator-admin", "cluster-admin")),
    Row(f"remove the finalizer {FINALIZER} from a learner", "PATCH", LNS_PATH + "/{lns}",
        {"metadata": {"finalizers": None}}, MERGE_PATCH,
        expect={**_all(ALLOWED), **_all("finalizer", *GUARDIANS)}),
)


def markdown_matrix() -> str:
    """The matrix as docs/security.md shows it."""
    lines = ["| request | " + " | ".join(who.title for who in WHO) + " |",
             "| --- |" + " --- |" * len(WHO)]
    for row in MATRIX:
        lines.append(f"| {row.title} | " + " | ".join(SHOWN[row.outcome(who.key)] for who in WHO) + " |")
    return "\n".join(lines) + "\n"


# ---- raw requests as someone else --------------------------------------------------------------
def fill(value: Any, names: Mapping[str, Any]) -> Any:
    """``value`` with every "{placeholder}" in its strings replaced; a string that is exactly one
    placeholder is replaced by the named value itself (which may be an object)."""
    if isinstance(value, str):
        if value.startswith("{") and value.endswith("}") and value[1:-1] in names:
            return names[value[1:-1]]
        return value.format(**names)
    if isinstance(value, dict):
        return {fill(k, names): fill(v, names) for k, v in value.items()}
    if isinstance(value, list):
        return [fill(v, names) for v in value]
    return value


@dataclass
class Reply:
    status: int
    message: str


class Raw:
    """HTTP to the API server with the admin kubeconfig's credentials, impersonating whom it is told
    (several Impersonate-Group headers, which the kubernetes client cannot send)."""

    def __init__(self, kubeconfig: Path, workdir: Path) -> None:
        config = yaml.safe_load(kubeconfig.read_text())
        context = next(c["context"] for c in config["contexts"]
                       if c["name"] == config.get("current-context", config["contexts"][0]["name"]))
        cluster = next(c["cluster"] for c in config["clusters"] if c["name"] == context["cluster"])
        user = next(u["user"] for u in config["users"] if u["name"] == context["user"])
        url = urlparse(cluster["server"])
        self.host, self.port = url.hostname or "", url.port or 443
        self.ctx = ssl.create_default_context()
        if "certificate-authority-data" in cluster:
            self.ctx.load_verify_locations(cadata=base64.b64decode(cluster["certificate-authority-data"]).decode())
        elif "certificate-authority" in cluster:
            self.ctx.load_verify_locations(cafile=cluster["certificate-authority"])
        self.ctx.check_hostname = False  # the local API server's certificate names 127.0.0.1 as an IP SAN
        self.token = user.get("token")
        if "client-certificate-data" in user:
            cert, key = workdir / "authz-client.crt", workdir / "authz-client.key"
            cert.write_bytes(base64.b64decode(user["client-certificate-data"]))
            key.write_bytes(base64.b64decode(user["client-key-data"]))
            self.ctx.load_cert_chain(cert, key)
        elif "client-certificate" in user:
            self.ctx.load_cert_chain(user["client-certificate"], user["client-key"])

    def __call__(self, who: Who, method: str, path: str, body: Any = None,
                 content_type: str = "application/json", names: Mapping[str, Any] | None = None) -> Reply:
        conn = http.client.HTTPSConnection(self.host, self.port, context=self.ctx, timeout=30)
        try:
            conn.putrequest(method, path)
            conn.putheader("Accept", "application/json")
            if self.token:
                conn.putheader("Authorization", f"Bearer {self.token}")
            if who.user:
                conn.putheader("Impersonate-User", who.user.format(**(names or {})))
                for group in who.groups:
                    conn.putheader("Impersonate-Group", group.format(**(names or {})))
            data = json.dumps(body).encode() if body is not None else b""
            if body is not None:
                conn.putheader("Content-Type", content_type)
            conn.putheader("Content-Length", str(len(data)))
            conn.endheaders(data)
            response = conn.getresponse()
            text = response.read().decode()
        finally:
            conn.close()
        try:
            message = str(json.loads(text).get("message", "")) if response.status >= 300 else ""
        except ValueError:
            message = text
        return Reply(response.status, message)


def classify(reply: Reply, who: str) -> str:
    """The outcome a reply shows; anything else (a 404, a 422) fails the test with the reply."""
    if 200 <= reply.status < 300:
        return ALLOWED
    if reply.status == 403 and "ValidatingAdmissionPolicy '" in reply.message:
        policy = reply.message.split("ValidatingAdmissionPolicy '", 1)[1].split("'", 1)[0]
        for code, (name, message, _shown) in DENIALS.items():
            if name == policy and message in reply.message:
                return code
        return f"unknown policy denial: {reply.message}"
    if reply.status == 403 and " cannot " in reply.message:
        return RBAC
    return f"unexpected {reply.status} for {who}: {reply.message}"


# ---- the cluster under test ------------------------------------------------------------------
@dataclass
class Setup:
    kube: Kube
    raw: Raw
    names: dict[str, Any]

    def send(self, who: Who, row: Row) -> Reply:
        path = fill(row.path, self.names)
        if row.dry_run:
            path += ("&" if "?" in path else "?") + "dryRun=All"
        names = {**self.names, "me": who.user or "the-cluster-admin"}
        return self.raw(who, row.method, path, fill(row.body, names), row.content_type, names)


ADMIN = next(w for w in WHO if w.key == "cluster-admin")
THE_OPERATOR = next(w for w in WHO if w.key == "operator")


def _exists(kube: Kube, kind: str, name: str) -> bool:
    return kube.kubectl("get", kind, name, "--ignore-not-found", "-o", "name").stdout.strip() != ""


def _apply(kube: Kube, *objs: dict[str, Any]) -> None:
    kube.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objs)}))


def _lns(name: str, learner_id: str, guarded: bool = False) -> dict[str, Any]:
    """A sample learner; ``guarded``: with the operator's finalizer, and the test's guardians listed."""
    body = yaml.safe_load((MANIFESTS / "samples" / "learnernamespace-minimal.yaml").read_text())
    body["metadata"] = {"name": name}
    body["spec"]["learnerId"] = learner_id
    if guarded:
        body["metadata"]["finalizers"] = [FINALIZER]
        body["spec"]["guardians"] = [{"kind": "User", "name": GUARDIAN_USER}, {"kind": "Group", "name": GUARDIAN_GROUP}]
    return dict(body)


@pytest.fixture(scope="module")
def cluster(kube: Kube) -> Iterator[Setup]:
    uid = f"{time.time_ns() % 0xFFFFFF:06x}"
    names: dict[str, Any] = {
        "uid": uid, "a": f"lrn-authz-a-{uid}", "b": f"lrn-authz-b-{uid}", "app": f"other-app-{uid}",
        "lns": f"authz-{uid}", "fresh": f"authz-fresh-{uid}", "approved": f"authz-approved-{uid}",
        "lns_uid": naming.ns_uid(f"authz{uid}"), "fresh_uid": naming.ns_uid(f"authzfresh{uid}"),
        "new_lns": _lns(f"authz-new-{uid}", f"authznew{uid}"),
        "preapproved_lns": {**(pre := _lns(f"authz-pre-{uid}", f"authzpre{uid}")),
                            "metadata": {**pre["metadata"], "annotations": {APPROVAL: SAMPLE_GUARDIAN}}},
    }
    had = {p: _exists(kube, "validatingadmissionpolicy", p) for p in POLICIES}
    had_roles = {r: _exists(kube, "clusterrole", r) for r in PEOPLE_ROLES}
    kube.kubectl("apply", "-k", str(REPO / "crds"))
    kube.kubectl("wait", "--for=delete", "namespace/privatefm-system", "--timeout=90s", check=False)
    for manifest in ("namespace.yaml", "rbac.yaml", "learner-role.yaml", "people-roles.yaml", "admission.yaml"):
        kube.kubectl("apply", "-f", str(MANIFESTS / manifest))
    kube.wait_established("learnernamespaces.privatefm.io", "adaptermerges.privatefm.io")

    # Two learner namespaces (as the operator labels them), another app's, and what lives in them.
    ns = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": names[k], "labels": MANAGED}}
          for k in ("a", "b")]
    ns.append({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": names["app"]}})
    secrets = [{"apiVersion": "v1", "kind": "Secret", "metadata": {"name": f"authz-{uid}", "namespace": where},
                "stringData": {"password": "hunter2"}} for where in ("kube-system", names["a"], names["app"])]
    # Suspended: nothing runs; they are only deleted (in dry runs).
    jobs = [{**JOB, "metadata": {"name": f"authz-del-{uid}", "namespace": where},
             "spec": {**JOB["spec"], "suspend": True}} for where in ("kube-system", names["a"])]
    grants = (
        (names["a"], "privatefm-learner", "learner-a@learners.test"),
        (names["b"], "privatefm-learner", "learner-b@learners.test"),
        (names["app"], "admin", "admin@other-app.test"),
        # `admin` is an aggregated role, and the test control plane runs no aggregation controller:
        # its parts are bound beside it (where the controller runs, they are a subset of admin).
        *((names["app"], f"system:aggregate-to-{part}", "admin@other-app.test") for part in ("admin", "edit", "view")),
    )
    bindings = [{"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                 "metadata": {"name": f"authz-{i}", "namespace": where},
                 "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
                 "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]}
                for i, (where, role, user) in enumerate(grants)]
    guardians = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                 "metadata": {"name": f"authz-guardians-{uid}"},
                 "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                             "name": "privatefm-guardian"},
                 "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": GUARDIAN_USER},
                              {"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": GUARDIAN_GROUP},
                              {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": SAMPLE_GUARDIAN}]}
    _apply(kube, *ns)
    _apply(kube, *secrets, *jobs, *bindings, guardians, _lns(names["lns"], f"authz{uid}", guarded=True),
           _lns(names["fresh"], f"authzfresh{uid}"), _lns(names["approved"], f"authzapproved{uid}"),
           {"apiVersion": "privatefm.io/v1alpha1", "kind": "AdapterMerge",
            "metadata": {"name": f"am-{uid}", "namespace": names["a"]}, "spec": {"trigger": "Manual"}})
    setup = Setup(kube, Raw(kube.kubeconfig, kube.workdir), names)
    # A learner the fixture's guardians do not guard, approved by its own (the sample's) guardian.
    sample_guardian = Who("sample-guardian", "sample guardian", SAMPLE_GUARDIAN, ("system:authenticated",))
    wait_for(lambda: setup.raw(sample_guardian, "PATCH", LNS_PATH + f"/{names['approved']}",
                               {"metadata": {"annotations": {APPROVAL: SAMPLE_GUARDIAN}}}, MERGE_PATCH).status == 200,
             30, "the sample guardian's approval")

    # Policies take a moment to be enforced: wait until each one bites.
    unlabelled = next(r for r in MATRIX if r.title.startswith("create a namespace without"))
    status = next(r for r in MATRIX if r.title == "patch the status of a LearnerNamespace")
    wait_for(lambda: classify(setup.send(THE_OPERATOR, unlabelled), "operator") == "ns-create", 60,
             "the confinement policy to be enforced")
    wait_for(lambda: classify(setup.send(ADMIN, status), "cluster-admin") == "status", 60,
             "the status-writers policy to be enforced")
    # The learner's nsUid, as the operator records it (a running operator would record the same).
    recorded = setup.raw(THE_OPERATOR, "PATCH", LNS_PATH + f"/{names['lns']}/status",
                         {"status": {"nsUid": names["lns_uid"]}}, "application/merge-patch+json")
    assert recorded.status == 200, recorded
    change = next(r for r in MATRIX if r.title == "change status.nsUid of a LearnerNamespace")
    wait_for(lambda: classify(setup.send(THE_OPERATOR, change), "operator") == "nsuid", 60,
             "the nsUid policy to be enforced")
    for title, code in (("approve a learner's deletion in one's own name", "not-guardian"),
                        ("delete learner A's namespace (after a guardian's approval)", "ns-delete"),
                        ("create a Scheduled AdapterMerge in learner A's namespace", "scheduled")):
        row = next(r for r in MATRIX if r.title == title)
        wait_for(lambda row=row, code=code: classify(setup.send(ADMIN, row), "cluster-admin") == code, 60,
                 f"the policy behind {code} to be enforced")
    try:
        yield setup
    finally:
        # A cluster admin may strip the guardian finalizer (break-glass); nothing runs to remove it here.
        kube.kubectl("patch", "lns", names["lns"], "--type=merge", "-p", json.dumps({"metadata": {"finalizers": None}}),
                     check=False)
        kube.kubectl("delete", "lns", names["lns"], names["fresh"], names["approved"], "--wait=false",
                     "--ignore-not-found", check=False)
        kube.kubectl("delete", "clusterrolebinding", f"authz-guardians-{uid}", "--ignore-not-found", check=False)
        for where in ("kube-system", names["app"]):
            kube.kubectl("delete", "secret", f"authz-{uid}", "-n", where, "--ignore-not-found", check=False)
        kube.kubectl("delete", "job", f"authz-del-{uid}", "-n", "kube-system", "--ignore-not-found", check=False)
        # A running operator (another module's) would have made namespaces for the two learners.
        extra = [naming.namespace_name(i, naming.ns_uid(i)) for i in (f"authz{uid}", f"authzfresh{uid}",
                                                                          f"authzapproved{uid}")]
        # Only the operator deletes a managed namespace (policy namespace-deletion); the harness, a
        # cluster admin, takes the label off first.
        for managed in (names["a"], names["b"], *extra):
            kube.kubectl("label", "namespace", managed, f"{naming.LABEL_MANAGED_BY}-", check=False)
        kube.kubectl("delete", "namespace", names["a"], names["b"], names["app"], *extra, "--wait=false",
                     "--ignore-not-found", check=False)
        for policy in POLICIES:  # leave the cluster as other modules expect it
            if not had[policy]:
                kube.kubectl("delete", "validatingadmissionpolicybinding,validatingadmissionpolicy", policy,
                             "--ignore-not-found", check=False)
        for role in PEOPLE_ROLES:
            if not had_roles[role]:
                kube.kubectl("delete", "clusterrole", role, "--ignore-not-found", check=False)


@pytest.mark.cluster
def test_authorization_matrix(cluster: Setup) -> None:
    """Every cell: the operator, its merge pods, two learners, another app's admin, a cluster admin and
    anonymous, against what the operator must and must never do."""
    wrong: list[str] = []
    seen: list[list[str]] = []
    for row in MATRIX:
        cells = []
        for who in WHO:
            got = classify(cluster.send(who, row), who.key)
            expected = row.outcome(who.key)
            ok = got in expected.split("|")
            cells.append(SHOWN[expected] if ok else f"**{got}** (expected {SHOWN[expected]})")
            if not ok:
                wrong.append(f"{row.title} / {who.title}: got {got}, expected {expected}")
        seen.append(cells)
    print("\n| request | " + " | ".join(who.title for who in WHO) + " |")
    for row, cells in zip(MATRIX, seen, strict=True):
        print(f"| {row.title} | " + " | ".join(cells) + " |")
    print(f"{len(MATRIX)} requests x {len(WHO)} identities = {len(MATRIX) * len(WHO)} cells")
    assert not wrong, "\n".join(wrong)


@pytest.mark.cluster
def test_policies_admit_the_operators_whole_provisioning(cluster: Setup) -> None:
    """A learner namespace and each child the operator applies, built by the operator's own builders
    and sent as it sends them (server-side apply, dry run): nothing it needs is refused."""
    from privatefm_operator import builders
    from privatefm_operator.api import LearnerNamespace
    from privatefm_operator.kube import FIELD_MANAGER, RESOURCES
    from privatefm_operator.reconcilers.learner import learner_of
    from privatefm_operator.settings import Settings

    body = _lns(cluster.names["lns"], f"authz{cluster.names['uid']}")
    body["metadata"]["uid"] = "00000000-0000-0000-0000-000000000000"
    learner = learner_of(LearnerNamespace.model_validate(body))
    # Learner A's namespace stands in for the learner's own: same labels, and it exists already.
    namespace = builders.namespace(learner)
    namespace["metadata"]["name"] = cluster.names["a"]
    children = builders.children(learner, Settings())
    for child in children:
        child["metadata"]["namespace"] = cluster.names["a"]
    for obj in [namespace, *children]:
        prefix, plural, namespaced = RESOURCES[obj["kind"]]
        where = f"/namespaces/{cluster.names['a']}" if namespaced else ""
        path = f"{prefix}{where}/{plural}/{obj['metadata']['name']}?fieldManager={FIELD_MANAGER}&force=true&dryRun=All"
        reply = cluster.raw(THE_OPERATOR, "PATCH", path, obj, "application/apply-patch+yaml")
        assert reply.status in (200, 201), (obj["kind"], reply)
    assert {o["kind"] for o in children} >= {"ServiceAccount", "NetworkPolicy", "ResourceQuota", "CronJob"}


# ---- without a cluster -----------------------------------------------------------------------
def _objs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


@functools.cache
def _helm(*args: str) -> list[dict[str, Any]]:
    proc = subprocess.run([str(BIN / "helm"), "template", *args], capture_output=True, text=True, timeout=120,
                          check=True)
    return _objs(proc.stdout)


def _grants(objs: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {(group, resource, verb)
            for o in objs if o["kind"] == "ClusterRole"
            and not o["metadata"]["name"].endswith(("-learner", "-learner-admin", "-guardian", "-view", "-edit"))
            for rule in o["rules"] for group in rule["apiGroups"] for resource in rule["resources"]
            for verb in rule["verbs"]}


# What the operator calls, and who calls it (operator/privatefm_operator/kube.py, reconcilers/*, kopf).
OPERATOR_CALLS = {
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},        # kopf: resource discovery
    ("", "events"): {"create"},                                                      # Kube.event, kopf posting
    ("privatefm.io", "learnernamespaces"): {"get", "list", "watch", "patch"},        # get; the watch; the finalizer
    ("privatefm.io", "learnernamespaces/status"): {"patch"},                         # write_status
    ("privatefm.io", "adaptermerges"): {"get", "list", "watch", "create", "patch"},  # + scheduled-run records
    ("privatefm.io", "adaptermerges/status"): {"patch"},
    ("", "namespaces"): {"get", "list", "watch", "create", "patch", "delete"},       # get; watch; apply; deletion
    ("", "serviceaccounts"): {"list", "watch", "create", "patch"},                   # watch (drift); apply
    ("", "secrets"): {"create", "patch"},                                            # apply only: never read
    ("", "resourcequotas"): {"list", "watch", "create", "patch"},
    ("", "limitranges"): {"list", "watch", "create", "patch"},
    ("networking.k8s.io", "networkpolicies"): {"list", "watch", "create", "patch"},
    ("batch", "cronjobs"): {"get", "list", "watch", "create", "patch"},              # watch; apply; owner check
    ("batch", "jobs"): {"get", "list", "watch", "create", "patch", "delete"},        # + delete a verify Job; kopf
    ("", "pods"): {"list"},                                                          # a run's termination message
}
# In its own namespace only (a Role): the shards' Leases (privatefm_operator.leases).
OPERATOR_NAMESPACE_CALLS = {("coordination.k8s.io", "leases"): {"get", "list", "create", "patch"}}


def test_operator_rbac_is_exactly_what_it_calls() -> None:
    expected = {(g, r, v) for (g, r), verbs in OPERATOR_CALLS.items() for v in verbs}
    for source in (_objs((MANIFESTS / "rbac.yaml").read_text()),
                   _helm("privatefm-operator", str(CHART), "--namespace", "privatefm-system")):
        granted = _grants(source)
        assert granted == expected, sorted(granted ^ expected)
        (role,) = [o for o in source if o["kind"] == "Role"]
        assert role["metadata"]["namespace"] == "privatefm-system"
        assert _grants([{**role, "kind": "ClusterRole"}]) == {
            (g, r, v) for (g, r), verbs in OPERATOR_NAMESPACE_CALLS.items() for v in verbs}
    assert {g for g in expected if g[2] in ("delete", "deletecollection", "update", "escalate", "bind")} == {
        ("", "namespaces", "delete"), ("batch", "jobs", "delete")}
    assert not {("", "secrets", v) for v in ("get", "list", "watch")} & expected


def test_chart_renders_the_manifests_policies_for_its_own_release() -> None:
    def policies(objs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
        return {(o["kind"], o["metadata"]["name"]): o["spec"] for o in objs
                if o["kind"].startswith("ValidatingAdmissionPolicy")}

    manifests = policies(_objs((MANIFESTS / "admission.yaml").read_text()))
    assert {name for _kind, name in manifests} == set(POLICIES)
    assert policies(_helm("privatefm-operator", str(CHART), "--namespace", "privatefm-system")) == manifests
    # Another release in another namespace confines its own ServiceAccount, under its own names.
    other = policies(_helm("pfm", str(CHART), "--namespace", "ops"))
    assert {name for _kind, name in other} == {p.replace("privatefm-operator", "pfm-privatefm-operator")
                                               for p in POLICIES}
    text = json.dumps(list(other.values()))
    assert "system:serviceaccount:ops:pfm-privatefm-operator" in text and "privatefm-system" not in text
    assert not policies(_helm("x", str(CHART), "--set", "admissionPolicies.create=false"))


def test_policies_fail_closed_and_deny() -> None:
    objs = _objs((MANIFESTS / "admission.yaml").read_text())
    for obj in objs:
        if obj["kind"] == "ValidatingAdmissionPolicy":
            assert obj["spec"]["failurePolicy"] == "Fail"
            assert all(v.get("message") and v.get("messageExpression") for v in obj["spec"]["validations"])
        else:
            assert obj["spec"]["validationActions"] == ["Deny"]
    confinement = next(o for o in objs if o["metadata"]["name"] == "privatefm-operator-confinement")
    (rule,) = confinement["spec"]["matchConstraints"]["resourceRules"]
    assert rule["operations"] == ["CREATE", "UPDATE", "DELETE"] and rule["resources"] == ["*/*"]
    assert OPERATOR in confinement["spec"]["matchConditions"][0]["expression"]


def test_learner_role_is_the_same_in_manifests_and_chart() -> None:
    (manifest,) = _objs((MANIFESTS / "learner-role.yaml").read_text())
    chart = [o for o in _helm("privatefm-operator", str(CHART), "--set", "learnerRole.create=true")
             if o["kind"] == "ClusterRole" and o["metadata"]["name"].endswith("-learner")]
    assert [c["rules"] for c in chart] == [manifest["rules"]]
    assert not [o for o in _helm("privatefm-operator", str(CHART)) if o["metadata"]["name"].endswith("-learner")]


def test_security_doc_shows_the_tested_matrix() -> None:
    assert markdown_matrix() in DOC.read_text(), f"docs/security.md: paste this matrix:\n{markdown_matrix()}"


def test_every_row_names_known_identities_and_outcomes() -> None:
    keys = {w.key for w in WHO}
    for row in MATRIX:
        assert set(row.expect) <= keys, row.title
        assert {row.outcome(k) for k in keys} <= set(SHOWN), row.title
    assert len({row.title for row in MATRIX}) == len(MATRIX)


if __name__ == "__main__":  # `python tests/test_authorization.py` prints the matrix for docs/security.md
    print(markdown_matrix(), end="")
