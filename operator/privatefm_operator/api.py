"""The privatefm.io/v1alpha1 API: the single source of truth for both CRDs.

``crdgen`` turns these models into ``crds/*.yaml``; a test fails when the committed YAML is
stale. Defaults live here (the operator applies them) and are *not* written into the CRD, so
the API server never rewrites what GitOps applied. Field rules are patterns, enums and bounds;
cross-field and update rules are CEL (``x-kubernetes-validations``).
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema
from pydantic.alias_generators import to_camel

GROUP = "privatefm.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# Five whitespace-separated cron fields; CronJob's own macros and TZ= prefixes are not accepted here.
# The shape only: ``cron_field_rules`` checks each field's values as CronJob's parser does.
CRON_5_FIELDS = r"^([0-9*/,?A-Za-z()-]+[ \t]+){4}[0-9*/,?A-Za-z()-]+$"
# Path components of at most 14 characters, as Kubernetes checks a CronJob's timeZone. Whether the
# zone exists only the zone database knows: the operator reports an unknown one.
IANA_TIME_ZONE = r"^[A-Za-z][A-Za-z0-9_+-]{0,13}(/[A-Za-z0-9_+][A-Za-z0-9_+-]{0,13})*$"
GO_DURATION = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"
# A label key (also a taint key): an optional DNS-subdomain prefix of at most 253 characters and
# '/', then a name of at most 63. A label value is such a name or empty.
LABEL_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
LABEL_KEY = rf"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?{LABEL_NAME}$"
LABEL_VALUE = rf"^({LABEL_NAME})?$"
LABEL_KEY_TEXT = ("an optional DNS subdomain of at most 253 characters and '/', then a name of at most 63 "
                  "characters: alphanumerics, '-', '_' or '.', starting and ending with an alphanumeric")
# What the merge container may ask for; GPUs have their own field (merge.gpus).
RESOURCE_NAMES = ("cpu", "memory", "ephemeral-storage")


def cel(rule: str, message: str) -> dict[str, Any]:
    return {"rule": rule, "message": message}


def label_key_rule(var: str) -> str:
    """CEL: ``var`` is a label key (the prefix's 253 characters are beyond a regex)."""
    return f"{var}.matches(r'{LABEL_KEY}') && {var}.indexOf('/') <= 253"


# CronJob parses its schedule with robfig/cron's standard parser. Per field it takes a comma-separated
# list of `*` or `?` (every value), a value, or a range `a-b` with a <= b, each optionally `/step`
# (step >= 1; `a/step` runs from a to the field's maximum). Month and weekday also take English
# three-letter names in any case. Day of week is 0-6: that parser rejects 7. Stricter than the
# parser only where it is lax about nonsense: empty list items (`1,,2`), signs (`+5`), `*-5`.
MONTHS = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
WEEKDAYS = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]
# (name, its values as a regex (after any leading zeros, which the parser allows) and in words,
# its names, the number of its first name)
CRON_FIELDS: tuple[tuple[str, str, str, list[str], int], ...] = (
    ("minute", "[0-9]|[1-5][0-9]", "0-59", [], 0),
    ("hour", "[0-9]|1[0-9]|2[0-3]", "0-23", [], 0),
    ("day-of-month", "[1-9]|[12][0-9]|3[01]", "1-31", [], 0),
    ("month", "[1-9]|1[0-2]", "1-12 or JAN-DEC", MONTHS, 1),
    ("day-of-week", "[0-6]", "0-6 or SUN-SAT", WEEKDAYS, 0),
)
# Fields that also take Jenkins-style hashed items (H, H(a-b), H/n, H(a-b)/n): schedules.py.
HASHED_CRON_FIELDS = ("minute", "hour")


def cron_field_rules() -> list[Any]:  # list[JsonValue] for pydantic
    """One CEL rule per cron field: its items' syntax and value range by regex, a <= b in CEL.

    A name's number is its offset in the joined names divided by 3 (months count from 1)."""
    rules = []
    for index, (name, numbers, words, names, first) in enumerate(CRON_FIELDS):
        value = f"0*({numbers})" + (f"|(?i:{'|'.join(names)})" if names else "")
        step = "(/0*[1-9][0-9]{0,8})?"
        item = rf"^([*?]|({value})(-({value}))?){step}$"

        def number(v: str, names: list[str] = names, first: int = first) -> str:
            if not names:
                return f"int({v})"
            by_name = f"'{''.join(names)}'.indexOf({v}.lowerAscii()) / 3 + {first}"
            return f"({v}.matches('^[0-9]+$') ? int({v}) : {by_name})"

        ends = "r.split('/')[0].split('-')"
        field = f"self.replace('\\t', ' ').split(' ').filter(f, f != '')[{index}]"
        ordered = f"(!r.contains('-') || {number(ends + '[0]')} <= {number(ends + '[1]')})"
        hashed = ""
        if name in HASHED_CRON_FIELDS:
            item = rf"^(([*?]|({value})(-({value}))?){step}|H(\(({value})-({value})\))?{step})$"
            h_ordered = "int(r.split('(')[1].split('-')[0]) <= int(r.split('-')[1].split(')')[0])"
            ordered = f"(r.startsWith('H') ? (!r.contains('-') || {h_ordered}) : {ordered})"
            hashed = ", H, H(a-b) or H/n (a value of its own for each learner)"
        rule = (f"!self.matches(r'{CRON_5_FIELDS}') || {field}.split(',').all(r, r.matches(r'{item}') && "
                f"{ordered})")
        rules.append(cel(rule, f"schedule: the {name} field (#{index + 1}) takes *, ?, values {words}, ranges "
                               f"a-b with a <= b, steps /n with n >= 1{hashed}, and lists of those (a,b)"))
    return rules


# A resource quantity as in a PodSpec: an integer, or a string Kubernetes parses (500m, 1.5Gi, 2e3).
# Kubernetes' own regex for quantities is only a first cut before the parser, so it admits
# '1.2.3' or '1KKK'; CEL's isQuantity runs the parser itself.
Quantity = Annotated[
    int | str,
    WithJsonSchema({"x-kubernetes-int-or-string": True, "x-kubernetes-validations": [
        cel("type(self) == int || isQuantity(self)", "must be a quantity, e.g. 500m, 2, 1.5Gi or 32Gi"),
        cel("type(self) == int ? self >= 0 : (!isQuantity(self) || !quantity(self).isLessThan(quantity('0')))",
            "must not be negative"),
    ]}),
]


VERSION_ASSIGNMENTS_KEPT = 16  # LearnerNamespaceStatus.versionAssignments: the newest of them


class Model(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown wire fields are ignored on read."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    def wire(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


KOPF_STATE: dict[str, Any] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                              "description": "Handler progress kept by the kopf framework. Internal."}


class Status(Model):
    """An object's status as the operator writes it. ``kopf`` is the framework's own progress
    record: read, never written back by us (kopf patches it itself)."""

    kopf: dict[str, Any] | None = Field(default=None, json_schema_extra=KOPF_STATE)

    def wire(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json", exclude={"kopf"})


class Resource(Model):
    """Accessors for the standard metadata of a custom resource (kept as a plain dict)."""

    api_version: str
    kind: str
    metadata: dict[str, Any] = Field(default_factory=dict, description="Standard object metadata.")

    @property
    def name(self) -> str:
        return str(self.metadata["name"])

    @property
    def namespace(self) -> str | None:
        return self.metadata.get("namespace")

    @property
    def uid(self) -> str:
        return str(self.metadata.get("uid", ""))

    @property
    def generation(self) -> int | None:
        return self.metadata.get("generation")

    @property
    def deleting(self) -> bool:
        return bool(self.metadata.get("deletionTimestamp"))

    def ref(self) -> dict[str, Any]:
        """What an Event's ``involvedObject`` needs."""
        return {"apiVersion": self.api_version, "kind": self.kind, "metadata": self.metadata}


# ---- shared pieces ---------------------------------------------------------------------------
class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(Model):
    """A metav1.Condition: the latest observation of one aspect of the object's state."""

    type: str = Field(description="Type of condition in CamelCase, e.g. Ready.", max_length=316,
                      pattern=r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                              r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$")
    status: ConditionStatus = Field(description="Status of the condition: True, False or Unknown.")
    observed_generation: int | None = Field(
        default=None, ge=0, description="The .metadata.generation this condition was computed from.")
    last_transition_time: datetime = Field(
        description="When the condition last changed status (not when it was last written).")
    reason: str = Field(description="Machine-readable CamelCase reason for the last transition.",
                        max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    message: str = Field(default="", max_length=32768, description="Human-readable details.")


CONDITIONS_FIELD: dict[str, Any] = {
    "x-kubernetes-list-type": "map",
    "x-kubernetes-list-map-keys": ["type"],
}


class Toleration(Model):
    """A pod toleration for the merge pods (same meaning and rules as in a PodSpec)."""

    key: str | None = Field(
        default=None, max_length=317, description="Taint key the toleration applies to; empty (with Exists) "
                                                  "tolerates every taint.",
        json_schema_extra={"x-kubernetes-validations": [cel(
            f"self == '' || ({label_key_rule('self')})", f"a taint key is a label key: {LABEL_KEY_TEXT}")]})
    operator: Literal["Exists", "Equal"] | None = Field(
        default=None, description="Exists or Equal (default Equal).")
    value: str | None = Field(default=None, max_length=63, pattern=LABEL_VALUE,
                              description="Taint value to match with Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to match; empty matches all effects.")
    toleration_seconds: int | None = Field(
        default=None, ge=0, description="How long a NoExecute taint is tolerated before eviction.")

    model_config: ClassVar[ConfigDict] = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        cel("!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''",
            "value must be empty when operator is Exists") | {"fieldPath": ".value"},
        cel("(has(self.key) && self.key != '') || (has(self.operator) && self.operator == 'Exists')",
            "operator must be Exists when key is empty (which tolerates every taint)") | {"fieldPath": ".operator"},
        cel("!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
            "effect must be NoExecute when tolerationSeconds is set") | {"fieldPath": ".effect"},
    ]})


def _resource_names(which: str) -> dict[str, Any]:
    return {"maxProperties": 8, "x-kubernetes-validations": [cel(
        f"self.all(name, name in {list(RESOURCE_NAMES)})",
        f"{which} may name only {', '.join(RESOURCE_NAMES)} (set GPUs with merge.gpus)")]}


class Resources(Model):
    """CPU, memory and ephemeral-storage for the merge container. GPUs are set with merge.gpus."""

    requests: dict[str, Quantity] | None = Field(
        default=None, description="Minimum resources, e.g. {cpu: '4', memory: 32Gi}.",
        json_schema_extra=_resource_names("resources.requests"))
    limits: dict[str, Quantity] | None = Field(
        default=None, description="Maximum resources, e.g. {memory: 48Gi}.",
        json_schema_extra=_resource_names("resources.limits"))


# ---- LearnerNamespace ------------------------------------------------------------------------
class BaseModelRef(Model):
    """Which frozen foundation model the learner's copy is built from."""

    name: str = Field(
        description="Name of the base model in the store (base/<name>/v<k>/). Immutable.",
        min_length=1, max_length=63, pattern=DNS_LABEL,
        json_schema_extra={"x-kubernetes-validations": [cel("self == oldSelf", "baseModel.name is immutable")]})
    version: int | None = Field(
        default=None, ge=1, description="Pin a base version; when unset the latest published version is used.")


class GuardianKind(StrEnum):
    USER = "User"
    GROUP = "Group"


class Guardian(Model):
    """A Kubernetes user or group allowed to approve deletion of this learner."""

    kind: GuardianKind = Field(description="User or Group.")
    name: str = Field(min_length=1, max_length=253, description="The username or group name as authenticated.")


class MergeSettings(Model):
    """When and where the nightly merge runs."""

    schedule: str | None = Field(
        default=None, pattern=CRON_5_FIELDS, max_length=128,
        description="Cron schedule with 5 fields (minute 0-59, hour 0-23, day-of-month 1-31, month 1-12 or "
                    "JAN-DEC, day-of-week 0-6 or SUN-SAT), as a CronJob takes it. The minute and hour fields "
                    "also take H, H(a-b), H/n and H(a-b)/n: a value of the range stable for this learner "
                    "(as Jenkins' H), so 'H 2 * * *' runs at the learner's own minute past two. Default: once "
                    "a day at the learner's own point of the cluster's window (02:00-05:00 unless the operator "
                    "is configured otherwise). status.mergeSchedule shows the schedule in effect.",
        json_schema_extra={"x-kubernetes-validations": cron_field_rules()})
    time_zone: str | None = Field(
        default=None, pattern=IANA_TIME_ZONE, max_length=64,
        description="IANA time zone of the schedule, e.g. Europe/Berlin. Default: the controller's (UTC).",
        json_schema_extra={"x-kubernetes-validations": [cel(
            "self.lowerAscii() != 'local'", "timeZone must name an IANA time zone, not Local")]})
    suspend: bool = Field(default=False, description="Stop scheduling new nightly merges. Manual merges still run.")
    gpus: int = Field(default=1, ge=0, le=8, description="nvidia.com/gpu per merge pod. Default 1; 0 merges on CPU.")
    resources: Resources | None = Field(default=None, description="CPU and memory for the merge pod.")
    node_selector: dict[str, Annotated[str, Field(max_length=63, pattern=LABEL_VALUE)]] | None = Field(
        default=None, description="Node labels the merge pod must run on.",
        json_schema_extra={"maxProperties": 16, "x-kubernetes-validations": [cel(
            f"self.all(key, {label_key_rule('key')})", f"nodeSelector keys must be label keys: {LABEL_KEY_TEXT}")]})
    tolerations: list[Toleration] | None = Field(
        default=None, max_length=16, description="Tolerations for the merge pod, e.g. for tainted GPU nodes.")


class Retention(Model):
    """How many verified checkpoint versions the store keeps."""

    keep: int = Field(default=3, ge=1, le=100,
                      description="Verified versions kept besides the current one (older ones are pruned). Default 3.")


class LearnerNamespaceSpec(Model):
    """Desired state of one learner's private foundation model."""

    learner_id: str = Field(
        min_length=1, max_length=40, pattern=DNS_LABEL,
        description="Stable id of the learner: a DNS label (lower-case letters, digits, '-'), at most 40. "
                    "Immutable.",
        json_schema_extra={"x-kubernetes-validations": [cel("self == oldSelf", "learnerId is immutable")]})
    subjects: list[Annotated[str, Field(min_length=1, max_length=63, pattern=DNS_LABEL)]] = Field(
        default_factory=list, max_length=64,
        description="Subjects the learner studies (DNS labels, unique), e.g. [math, reading].",
        json_schema_extra={"x-kubernetes-list-type": "set"})
    base_model: BaseModelRef = Field(
        description="The frozen base model. Its name is immutable; the pinned version may change.")
    guardians: list[Guardian] = Field(
        min_length=1, max_length=16,
        description="Users or groups allowed to approve this learner's deletion (unique by kind and name).",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["kind", "name"]})
    deletion_delay: str = Field(
        default="24h", pattern=GO_DURATION, max_length=32,
        description="Go-style duration between guardian approval and deletion, e.g. 24h or 90m. "
                    "Default 24h; at most 8760h.",
        json_schema_extra={"x-kubernetes-validations": [
            cel("duration(self) <= duration('8760h')", "deletionDelay must be at most 8760h")]})
    merge: MergeSettings | None = Field(default=None, description="Nightly merge settings.")
    retention: Retention | None = Field(default=None, description="Checkpoint retention; default keep 3.")

    def merge_settings(self) -> MergeSettings:
        return self.merge or MergeSettings()


class LearnerPhase(StrEnum):
    PROVISIONING = "Provisioning"           # first seen: the namespace and its children are being set up
    READY = "Ready"
    DEGRADED = "Degraded"
    RECOVERING = "Recovering"               # a fallback (re-clone and adapter replay) is under way
    FAILED = "Failed"
    AWAITING_GUARDIAN = "AwaitingGuardian"  # deletion requested; waiting for approval and the delay
    DELETING = "Deleting"                   # approved and due: the namespace and store prefix go


class Checkpoint(Model):
    """A verified checkpoint in the store."""

    version: int = Field(ge=1, description="Checkpoint version (v<N>), increasing per learner.")
    uri: str = Field(description="s3:// URI of the checkpoint directory.")
    manifest_sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the checkpoint's manifest.json.")
    base_version: int = Field(ge=1, description="Base model version the checkpoint was merged from.")
    adapter_seq: int | None = Field(default=None, ge=0, description="Newest adapter sequence number merged.")
    adapter_seqs: list[int] | None = Field(default=None, description="Adapter sequence numbers folded, in order.")
    size_bytes: int | None = Field(default=None, ge=0, description="Total size of the checkpoint's files.")
    verified_at: datetime | None = Field(default=None, description="When the operator verified the manifest.")


class VersionAssignment(Model):
    """A version handed to a run."""

    version: int = Field(ge=1, description="The version.")
    merge_uid: str = Field(max_length=64, description="The uid of the AdapterMerge it was handed to.")


class DeletionStatus(Model):
    """Progress of a guardian-approved deletion. Every step is recorded, so a restarted operator
    goes on where it stopped and never repeats or skips one."""

    requested_at: datetime | None = Field(default=None, description="When deletion was requested.")
    approved_by: str | None = Field(default=None, description="Guardian who approved (the annotation's value).")
    approved_at: datetime | None = Field(default=None, description="When the operator first saw the approval.")
    not_before: datetime | None = Field(
        default=None, description="max(requestedAt, approvedAt) + deletionDelay: the earliest time it may run.")
    started_at: datetime | None = Field(
        default=None, description="When deletion began; from here on it can no longer be revoked.")
    namespace_deleted_at: datetime | None = Field(default=None, description="When the namespace was gone.")
    store_objects_removed: int | None = Field(default=None, ge=0, description="Objects removed from the store.")
    store_bytes_removed: int | None = Field(default=None, ge=0, description="Bytes removed from the store.")
    audit_record: str | None = Field(default=None, description="s3:// URI of the audit record, which outlives "
                                                               "the learner.")


class IntegrityStatus(Model):
    """Results of the integrity checks of the current checkpoint."""

    checked_at: datetime | None = Field(default=None, description="Last cheap check (manifest, sizes, checksums).")
    checked_version: int | None = Field(default=None, description="Checkpoint version the cheap check looked at.")
    deep_checked_at: datetime | None = Field(default=None, description="Last deep check (every byte re-hashed).")
    deep_checked_version: int | None = Field(default=None, description="Version the deep check looked at.")
    verify_job: str | None = Field(default=None, description="The deep-check Job under way, if any.")
    verify_version: int | None = Field(default=None, description="The checkpoint version that Job checks.")
    deep_checks: int = Field(default=0, ge=0, description="Deep checks started for this learner; names their Jobs.")
    verify_request: str | None = Field(default=None, description="Last verify-requested annotation value handled.")
    failed_version: int | None = Field(default=None, description="The checkpoint version that failed a check.")
    reason: str | None = Field(default=None, description="ChecksumMismatch, SizeMismatch, FileMissing or "
                                                         "ManifestMissing.")
    file: str | None = Field(default=None, description="The file that failed.")
    message: str | None = Field(default=None, description="Details of the failure.")


class RecoveryStatus(Model):
    """A fallback: re-clone from the base model and replay the adapter log into a new version."""

    id: int = Field(ge=1, description="Counts fallbacks of this learner; names its AdapterMerges.")
    reason: str = Field(description="Corruption, VersionLag or Requested.")
    message: str | None = Field(default=None, description="What triggered it.")
    started_at: datetime | None = Field(default=None, description="When it began.")
    generation: int | None = Field(default=None, description="Spec generation it began under.")
    request: str | None = Field(default=None, description="fallback-requested annotation value it answers.")
    attempts: int = Field(default=0, ge=0, description="Fallback merges that failed so far.")
    merge: str | None = Field(default=None, description="The AdapterMerge of the current attempt.")
    next_attempt_at: datetime | None = Field(default=None, description="Not before this time (back-off).")
    completed_at: datetime | None = Field(default=None, description="When it produced a verified version.")
    failed_at: datetime | None = Field(default=None, description="When it gave up (fallbackRetryLimit reached).")


class RetentionStatus(Model):
    last_run_at: datetime | None = Field(default=None, description="When retention last ran.")
    versions_pruned: int | None = Field(default=None, description="Checkpoint versions pruned by the last run.")
    bytes_pruned: int | None = Field(default=None, description="Bytes pruned by the last run.")
    request: str | None = Field(default=None, description="Last prune-requested annotation value handled.")


class LearnerNamespaceStatus(Status):
    """Observed state, written by the operator."""

    observed_generation: int | None = Field(default=None, description="Generation last reconciled.")
    conditions: list[Condition] = Field(
        default_factory=list, description="Ready, Reconciling, Stalled (kstatus), Degraded and ScopedStoreCredentials.",
        json_schema_extra=CONDITIONS_FIELD)
    phase: LearnerPhase | None = Field(default=None, description="Summary phase for humans.")
    ns_uid: str | None = Field(default=None, description="Stable id the namespace and store prefix derive from.")
    namespace: str | None = Field(default=None, description="Name of the learner's namespace.")
    merge_schedule: str | None = Field(
        default=None, description="The nightly CronJob's schedule: spec.merge.schedule with its H fields resolved, "
                                  "or this learner's point of the cluster's default window.")
    current_checkpoint: Checkpoint | None = Field(default=None, description="The latest verified checkpoint.")
    last_assigned_version: int | None = Field(
        default=None, ge=0, description="Highest checkpoint version handed to a merge (versions never repeat).")
    version_assignments: list[VersionAssignment] = Field(
        default_factory=list, max_length=VERSION_ASSIGNMENTS_KEPT,
        description="The runs the newest versions were handed to: a run whose own record of its version was "
                    "lost (the operator stopped in between) takes the same version again, so none is skipped.")
    base_model_latest_version: int | None = Field(default=None, description="Latest published base version.")
    version_lag: int | None = Field(
        default=None, description="Latest base version minus the current checkpoint's base version.")
    deletion: DeletionStatus | None = Field(default=None, description="Guardian-approved deletion progress.")
    integrity: IntegrityStatus | None = Field(default=None, description="Integrity checks of the current checkpoint.")
    recovery: RecoveryStatus | None = Field(default=None, description="The latest fallback, under way or done.")
    retention: RetentionStatus | None = Field(default=None, description="The last retention run.")


class LearnerNamespace(Resource):
    """A learner's private copy of a foundation model: an isolated namespace, nightly merges, checkpoints."""

    api_version: Literal["privatefm.io/v1alpha1"] = Field(default="privatefm.io/v1alpha1",
                                                          description="privatefm.io/v1alpha1")
    kind: Literal["LearnerNamespace"] = Field(default="LearnerNamespace", description="LearnerNamespace")
    spec: LearnerNamespaceSpec = Field(description="Desired state.")
    status: LearnerNamespaceStatus | None = Field(default=None, description="Observed state.")


# ---- AdapterMerge ----------------------------------------------------------------------------
class MergeTrigger(StrEnum):
    SCHEDULED = "Scheduled"
    MANUAL = "Manual"
    FALLBACK = "Fallback"  # made by the operator: re-clone from the base and replay the adapter log


class MergePhase(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class AdapterMergeSpec(Model):
    """One merge run. Create one to request an on-demand merge; the spec cannot change afterwards."""

    trigger: MergeTrigger = Field(
        default=MergeTrigger.MANUAL,
        description="Why the run exists: Scheduled (the CronJob fired) or Manual (a user). Default Manual.")
    adapter_seq: int | None = Field(
        default=None, ge=0, description="Adapter sequence number to merge; default the newest.")
    base_version: int | None = Field(
        default=None, ge=1, description="Base model version to merge onto; default the learner's current one.")
    reason: str | None = Field(default=None, max_length=256, description="Free-text note on why it was requested.")


class JobRef(Model):
    name: str = Field(description="Name of the Job in the learner namespace.")
    uid: str | None = Field(default=None, description="UID of the Job.")


class AdapterMergeStatus(Status):
    """Observed state of one merge run."""

    observed_generation: int | None = Field(default=None, description="Generation last reconciled.")
    conditions: list[Condition] = Field(default_factory=list, description="Ready, Reconciling, Stalled.",
                                        json_schema_extra=CONDITIONS_FIELD)
    phase: MergePhase | None = Field(default=None, description="Pending, Running, Succeeded or Failed.")
    learner: str | None = Field(default=None, description="The LearnerNamespace this run belongs to.")
    target_version: int | None = Field(default=None, ge=1, description="Checkpoint version this run writes.")
    parent_version: int | None = Field(default=None, ge=1, description="Checkpoint that was current at start.")
    base_version: int | None = Field(default=None, ge=1, description="Base model version merged onto.")
    adapter_seq: int | None = Field(default=None, ge=0, description="Newest adapter sequence number merged.")
    adapter_seqs: list[int] | None = Field(default=None, description="Adapter sequence numbers folded, in order; "
                                                                     "empty for a re-clone of the base.")
    job: JobRef | None = Field(default=None, description="The Job running this merge.")
    started_at: datetime | None = Field(default=None, description="When the Job started.")
    completed_at: datetime | None = Field(default=None, description="When the run finished.")
    duration_seconds: float | None = Field(default=None, description="Merge wall time reported by the pod.")
    checkpoint: Checkpoint | None = Field(default=None, description="The verified checkpoint this run produced.")
    reason: str | None = Field(default=None, description="CamelCase reason of the outcome.")
    message: str | None = Field(default=None, description="Details of the outcome.")


class AdapterMerge(Resource):
    """One run that merges a learner's LoRA adapter into the base model, producing a checkpoint."""

    api_version: Literal["privatefm.io/v1alpha1"] = Field(default="privatefm.io/v1alpha1",
                                                          description="privatefm.io/v1alpha1")
    kind: Literal["AdapterMerge"] = Field(default="AdapterMerge", description="AdapterMerge")
    # Required, and immutable by a rule on the whole object: a rule on spec alone is skipped when an
    # update removes spec or adds one, so removing it and adding another would get past it.
    spec: AdapterMergeSpec = Field(description="What to merge. Required ({} takes every default). Immutable.")
    status: AdapterMergeStatus | None = Field(default=None, description="Observed state.")


# ---- CRD metadata the generator needs --------------------------------------------------------
class CrdInfo(Model):
    kind: str
    plural: str
    singular: str
    short_names: list[str]
    scope: Literal["Cluster", "Namespaced"]
    model: Any
    printer_columns: list[dict[str, Any]]
    root_rules: list[dict[str, Any]] = Field(default_factory=list)


CRDS = [
    CrdInfo(
        kind="LearnerNamespace", plural="learnernamespaces", singular="learnernamespace",
        short_names=["lns"], scope="Cluster", model=LearnerNamespace,
        printer_columns=[
            {"name": "Learner", "type": "string", "jsonPath": ".spec.learnerId"},
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {"name": "Checkpoint", "type": "integer", "jsonPath": ".status.currentCheckpoint.version",
             "description": "Version of the current verified checkpoint"},
            {"name": "Lag", "type": "integer", "jsonPath": ".status.versionLag",
             "description": "Base versions the checkpoint is behind"},
            {"name": "Namespace", "type": "string", "jsonPath": ".status.namespace", "priority": 1},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
        root_rules=[cel("self.metadata.name.size() <= 63", "metadata.name must be at most 63 characters "
                        "(it names the learner's namespace and labels)") | {"fieldPath": ".metadata.name"}],
    ),
    CrdInfo(
        kind="AdapterMerge", plural="adaptermerges", singular="adaptermerge",
        short_names=["am"], scope="Namespaced", model=AdapterMerge,
        printer_columns=[
            {"name": "Trigger", "type": "string", "jsonPath": ".spec.trigger"},
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {"name": "Version", "type": "integer", "jsonPath": ".status.targetVersion"},
            {"name": "Reason", "type": "string", "jsonPath": ".status.reason"},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
        # The run's Job carries the same name, and Job names are DNS labels.
        root_rules=[
            cel("self.metadata.name.size() <= 63 && self.metadata.name.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')",
                "metadata.name must be a DNS label of at most 63 characters (it names the merge Job)")
            | {"fieldPath": ".metadata.name"},
            cel("has(self.spec) == has(oldSelf.spec) && (!has(self.spec) || self.spec == oldSelf.spec)",
                "spec is immutable") | {"fieldPath": ".spec"},
        ],
    ),
]
