"""Change-driven provisioning's memory (pure: no server): what is applied, what is skipped, and which
watch events count as drift. tests/test_operator.py checks the same against the real API server."""

from __future__ import annotations

import copy
from typing import Any

from privatefm_operator import builders, decisions, naming
from privatefm_operator.api import LearnerNamespaceSpec
from privatefm_operator.reconcilers.children import Children
from privatefm_operator.settings import Settings

SPEC = LearnerNamespaceSpec.model_validate({
    "learnerId": "ada", "baseModel": {"name": "tiny"}, "guardians": [{"kind": "User", "name": "g"}]})
LEARNER = builders.Learner(name="ada", ns_uid="u1", namespace="learner-ada-u1", spec=SPEC)


def desired(kind: str) -> dict[str, Any]:
    objs = [builders.namespace(LEARNER), *builders.children(LEARNER, Settings())]
    return decisions.with_desired_hash(next(o for o in objs if o["kind"] == kind))


def as_served(obj: dict[str, Any]) -> dict[str, Any]:
    """What the API server answers: our fields, plus its own."""
    served = copy.deepcopy(obj)
    served["metadata"].update(uid="1", resourceVersion="7", managedFields=[{"manager": "privatefm-operator"}])
    served["metadata"]["labels"] = {**served["metadata"].get("labels", {}), "kubernetes.io/metadata.name": "x"}
    served["status"] = {}
    return served


def test_satisfies_ignores_what_others_add_and_sees_what_they_change() -> None:
    netpol = desired("NetworkPolicy")
    served = as_served(netpol)
    assert decisions.satisfies(netpol, served)
    served["spec"]["egress"] = served["spec"]["egress"][:1]
    assert not decisions.satisfies(netpol, served)
    opened = as_served(netpol)
    opened["spec"]["policyTypes"] = ["Egress"]  # someone dropped Ingress: the default-deny is gone
    assert not decisions.satisfies(netpol, opened)


def test_empty_lists_and_maps_the_api_server_omits_are_satisfied_by_their_absence() -> None:
    assert decisions.satisfies({"spec": {"ingress": [], "podSelector": {}}}, {"spec": {"podSelector": {}}})
    assert decisions.satisfies({"spec": {"ingress": []}}, {"spec": {}})
    assert not decisions.satisfies({"spec": {"ingress": [{"from": []}]}}, {"spec": {}})
    assert not decisions.satisfies({"spec": {"replicas": 0}}, {"spec": {}})


def test_the_hash_annotation_follows_the_spec() -> None:
    a, b = desired("CronJob"), desired("CronJob")
    assert a["metadata"]["annotations"][naming.DESIRED_HASH] == b["metadata"]["annotations"][naming.DESIRED_HASH]
    other = builders.Learner(name="ada", ns_uid="u1", namespace="learner-ada-u1",
                             spec=SPEC.model_copy(update={"merge": SPEC.merge_settings().model_copy(
                                 update={"schedule": "0 3 * * *"})}))
    changed = decisions.with_desired_hash(builders.cronjob(other, Settings()))
    assert changed["metadata"]["annotations"][naming.DESIRED_HASH] != a["metadata"]["annotations"][naming.DESIRED_HASH]


def test_an_applied_child_is_not_applied_again_until_it_drifts_or_the_spec_changes() -> None:
    children, netpol = Children(), desired("NetworkPolicy")
    assert children.needs_apply(netpol) == "unseen"
    children.applied("ada", netpol, as_served(netpol))
    assert children.needs_apply(netpol) is None
    # Our own apply's echo and unrelated changes (a new resourceVersion, labels others add) are not drift.
    assert children.on_event("NetworkPolicy", as_served(netpol), deleted=False) is None
    assert children.needs_apply(netpol) is None
    # Someone edits the policy: the learner is named for repair, and its next pass applies.
    edited = as_served(netpol)
    edited["spec"]["egress"] = []
    assert children.on_event("NetworkPolicy", edited, deleted=False) == "ada"
    assert children.needs_apply(netpol) == "drifted"
    children.applied("ada", netpol, as_served(netpol))
    # Deleted: repaired too.
    assert children.on_event("NetworkPolicy", as_served(netpol), deleted=True) == "ada"
    assert children.needs_apply(netpol)


def test_a_spec_change_applies_even_when_the_old_object_is_intact() -> None:
    children, cron = Children(), desired("CronJob")
    children.applied("ada", cron, as_served(cron))
    newer = copy.deepcopy(cron)
    newer["spec"]["schedule"] = "0 3 * * *"
    assert children.needs_apply(decisions.with_desired_hash(newer)) == "changed"


def test_events_for_children_not_applied_by_this_process_are_remembered_but_trigger_nothing() -> None:
    """After a restart: the learner's own first pass compares (and applies once)."""
    children, ns = Children(), desired("Namespace")
    assert children.on_event("Namespace", as_served(ns), deleted=False) is None
    seen = children.namespace(LEARNER.namespace)
    assert seen is not None and seen["metadata"]["labels"][naming.LABEL_LEARNER] == "ada"
    assert children.needs_apply(ns) == "unseen"


def test_the_learner_named_for_repair_is_the_one_recorded_not_the_childs_labels() -> None:
    children, quota = Children(), desired("ResourceQuota")
    children.applied("ada", quota, as_served(quota))
    forged = as_served(quota)
    forged["metadata"]["labels"][naming.LABEL_LEARNER] = "someone-else"
    forged["spec"]["hard"] = {}
    assert children.on_event("ResourceQuota", forged, deleted=False) == "ada"


def test_a_learner_is_settled_only_while_every_child_applied_for_it_is_as_asked() -> None:
    """What lets a pass skip building its children's requests (``LearnerReconciler.provision``)."""
    children, netpol, quota = Children(), desired("NetworkPolicy"), desired("ResourceQuota")
    assert not children.settled("ada")  # nothing applied yet
    children.applied("ada", netpol, as_served(netpol))
    children.applied("ada", quota, as_served(quota))
    assert children.settled("ada") and not children.settled("bob")
    edited = as_served(quota)
    edited["spec"]["hard"] = {}
    children.on_event("ResourceQuota", edited, deleted=False)
    assert not children.settled("ada")  # drifted: the next pass applies
    children.applied("ada", quota, as_served(quota))
    assert children.settled("ada")
    children.on_event("NetworkPolicy", as_served(netpol), deleted=True)
    assert not children.settled("ada")  # vanished
    children.forget("ada")
    assert not children.settled("ada")


def test_forgetting_a_learner_drops_all_it_had() -> None:
    children = Children()
    for kind in ("Namespace", "CronJob"):
        children.applied("ada", desired(kind), as_served(desired(kind)))
    children.forget("ada")
    assert children.on_event("CronJob", as_served(desired("CronJob")), deleted=True) is None
    # The namespace itself is known for as long as it exists: its deletion is what the watch reports.
    assert children.namespace(LEARNER.namespace) is not None
    assert children.on_event("Namespace", as_served(desired("Namespace")), deleted=True) is None
    assert children.namespace(LEARNER.namespace) is None


def test_every_namespace_is_known_and_a_name_is_free_only_once_all_were_listed() -> None:
    children = Children()
    foreign = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team-a", "labels": {"team": "a"}},
               "status": {"phase": "Active"}}
    assert not children.namespace_absent("team-a") and not children.namespace_absent("free")  # nothing listed yet
    assert children.on_event("Namespace", foreign, deleted=False) is None  # not the operator's: no learner to repair
    children.namespaces_listed.set()
    assert not children.namespace_absent("team-a") and children.namespace_absent("free")
    assert children.namespace("team-a") == {"metadata": {"name": "team-a", "labels": {"team": "a"}},
                                            "status": {"phase": "Active"}}
    assert ("", "team-a") in children.known("Namespace")  # a relist that lacks it reports it deleted
    children.on_event("Namespace", foreign, deleted=True)
    assert children.namespace_absent("team-a")


def test_a_namespace_applied_as_new_was_made_by_the_apply_only_when_no_other_manager_wrote_it() -> None:
    made = as_served(desired("Namespace"))
    assert decisions.made_by(made, "privatefm-operator")
    taken = copy.deepcopy(made)
    taken["metadata"]["managedFields"] = [{"manager": "kubectl-create", "operation": "Update"},
                                          {"manager": "privatefm-operator", "operation": "Apply"}]
    assert not decisions.made_by(taken, "privatefm-operator")


def test_full_resyncs_are_spread_over_a_quarter_of_the_interval() -> None:
    due_at = []
    for i in range(1000):
        assert not decisions.full_resync_due(f"l{i}", 3599, 3600)
        assert decisions.full_resync_due(f"l{i}", 4500, 3600)
        due_at.append(next(t for t in range(3600, 4501, 10) if decisions.full_resync_due(f"l{i}", t, 3600)))
    assert min(due_at) < 3700 and max(due_at) > 4400  # spread, not all at once
