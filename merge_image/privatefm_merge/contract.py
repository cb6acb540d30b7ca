"""The merge pod's contract with the operator: environment in, termination message out.

This module is the single place that contract is defined. It is imported by the operator (no
torch there), so it must stay free of heavy imports.

Inputs (environment of the ``privatefm-merge pod`` container):

=============================  ==========================================================
``PRIVATEFM_BASE_URI``         base checkpoint, ``s3://bucket/prefix`` or a local dir
``PRIVATEFM_ADAPTERS``         the adapters to fold, in fold order: a JSON list of
                               ``{"seq": 3, "uri": "s3://…"}`` (PEFT adapter dirs, ``s3://…``
                               or local; at least one). See :mod:`privatefm_merge.adapter_log`.
``PRIVATEFM_OUTPUT_URI``       checkpoint to create, ``s3://…`` or a local dir
``PRIVATEFM_BASE_MODEL``       base model name
``PRIVATEFM_BASE_VERSION``     base model version (int)
``PRIVATEFM_PARENT_VERSION``   previous checkpoint version (int), or empty for none
``PRIVATEFM_TARGET_VERSION``   version this merge creates (int)
``PRIVATEFM_DEVICE``           ``auto`` (default), ``cpu`` or ``cuda``
``PRIVATEFM_RESULT_PATH``      where the result JSON goes; default ``/dev/termination-log``
``PRIVATEFM_PART_SIZE_BYTES``  optional: S3 multipart part size (default 16 MiB, at least 5 MiB)
``AWS_ENDPOINT_URL`` …         S3 connection, read by boto3 (path-style addressing is used)
=============================  ==========================================================

Output: a :class:`MergeResult` as JSON (camelCase keys, < 4096 bytes) at the result path.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

ENV_BASE_URI = "PRIVATEFM_BASE_URI"
ENV_ADAPTERS = "PRIVATEFM_ADAPTERS"
ENV_OUTPUT_URI = "PRIVATEFM_OUTPUT_URI"
ENV_BASE_MODEL = "PRIVATEFM_BASE_MODEL"
ENV_BASE_VERSION = "PRIVATEFM_BASE_VERSION"
ENV_PARENT_VERSION = "PRIVATEFM_PARENT_VERSION"
ENV_TARGET_VERSION = "PRIVATEFM_TARGET_VERSION"
ENV_DEVICE = "PRIVATEFM_DEVICE"
ENV_RESULT_PATH = "PRIVATEFM_RESULT_PATH"
# Optional tuning, not set by the operator: S3 multipart part size (>= 5 MiB; default 16 MiB).
ENV_PART_SIZE = "PRIVATEFM_PART_SIZE_BYTES"
MIN_PART_SIZE = 5 * 1024 * 1024

# S3 connection: the standard variables boto3 reads itself.
ENV_S3_ENDPOINT = "AWS_ENDPOINT_URL"
ENV_S3_ACCESS_KEY = "AWS_ACCESS_KEY_ID"
ENV_S3_SECRET_KEY = "AWS_SECRET_ACCESS_KEY"
ENV_S3_SESSION_TOKEN = "AWS_SESSION_TOKEN"  # temporary (STS) credentials: every run gets its own
ENV_S3_REGION = "AWS_REGION"
DEFAULT_S3_REGION = "us-east-1"

DEFAULT_RESULT_PATH = "/dev/termination-log"
DEVICES = ("auto", "cpu", "cuda")
# Kubernetes keeps at most 4096 bytes of a termination message.
MAX_RESULT_BYTES = 4096

# The container command the operator's Job runs.
POD_COMMAND = ("privatefm-merge", "pod")


class Reason(StrEnum):
    """Why a merge failed (``MergeResult.reason``)."""

    CONFIG_INVALID = "ConfigInvalid"  # the job's environment is incomplete or malformed
    ADAPTER_INVALID = "AdapterInvalid"  # unsupported or malformed adapter
    BASE_INVALID = "BaseInvalid"  # base checkpoint missing or malformed
    SHAPE_MISMATCH = "ShapeMismatch"  # adapter tensors do not fit the base tensors
    NON_FINITE_RESULT = "NonFiniteResult"  # NaN or Inf in a merged tensor
    OUTPUT_FORBIDDEN = "OutputForbidden"  # output under base/, or equal to an input
    OUTPUT_EXISTS = "OutputExists"  # a different checkpoint is already committed there
    STORAGE_ERROR = "StorageError"  # reading or writing the store failed
    VERIFICATION_FAILED = "VerificationFailed"  # written files do not match what was hashed
    INTERNAL_ERROR = "InternalError"  # a bug


def _required(env: Mapping[str, str], name: str) -> str:
    value = env.get(name, "").strip()
    if not value:
        raise ValueError(f"environment variable {name} is required but missing or empty")
    return value


def _int(env: Mapping[str, str], name: str, *, optional: bool = False) -> int | None:
    raw = env.get(name, "").strip()
    if not raw:
        if optional:
            return None
        raise ValueError(f"environment variable {name} is required but missing or empty")
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None
    if value < 0:
        raise ValueError(f"environment variable {name} must be >= 0, got {value}")
    return value


@dataclass(frozen=True)
class AdapterRef:
    """One adapter of the learner's log: its sequence number and where its PEFT files are."""

    seq: int
    uri: str


def _adapters(env: Mapping[str, str], name: str) -> tuple[AdapterRef, ...]:
    raw = _required(env, name)
    example = '[{"seq": 3, "uri": "s3://…"}, …]'
    try:
        items = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"environment variable {name} is not JSON ({err}); expected {example}") from None
    if not isinstance(items, list) or not items:
        raise ValueError(f"environment variable {name} must be a non-empty JSON list like {example}")
    refs = []
    for item in items:
        seq = item.get("seq") if isinstance(item, dict) else None
        uri = item.get("uri") if isinstance(item, dict) else None
        if (not isinstance(seq, int) or isinstance(seq, bool) or seq < 0 or not isinstance(uri, str)
                or not uri.strip() or set(item) != {"seq", "uri"}):
            raise ValueError(f"environment variable {name}: each entry must be {{\"seq\": <int >= 0>, "
                             f"\"uri\": <non-empty string>}}, got {json.dumps(item)[:200]}")
        refs.append(AdapterRef(seq, uri.strip()))
    seqs = [r.seq for r in refs]
    if len(set(seqs)) != len(seqs):
        raise ValueError(f"environment variable {name}: sequence numbers repeat: {seqs}")
    return tuple(refs)


def adapters_to_env(adapters: Sequence[AdapterRef]) -> str:
    return json.dumps([{"seq": a.seq, "uri": a.uri} for a in adapters], separators=(",", ":"))


@dataclass(frozen=True)
class MergeJob:
    """One merge, as the operator's Job describes it through the environment."""

    base_uri: str
    adapters: tuple[AdapterRef, ...]  # in fold order
    output_uri: str
    base_model: str
    base_version: int
    parent_version: int | None
    target_version: int
    device: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "adapters", tuple(self.adapters))
        if not self.adapters:
            raise ValueError(f"{ENV_ADAPTERS} must list at least one adapter")
        if self.device not in DEVICES:
            raise ValueError(f"{ENV_DEVICE} must be one of {', '.join(DEVICES)}, got {self.device!r}")

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> MergeJob:
        """Parse the job; raises ``ValueError`` naming every missing or malformed variable."""
        errors: list[str] = []

        def attempt(parse: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return parse(env, *args, **kwargs)
            except ValueError as err:
                errors.append(str(err))
                return None

        values = {
            "base_uri": attempt(_required, ENV_BASE_URI),
            "adapters": attempt(_adapters, ENV_ADAPTERS),
            "output_uri": attempt(_required, ENV_OUTPUT_URI),
            "base_model": attempt(_required, ENV_BASE_MODEL),
            "base_version": attempt(_int, ENV_BASE_VERSION),
            "parent_version": attempt(_int, ENV_PARENT_VERSION, optional=True),
            "target_version": attempt(_int, ENV_TARGET_VERSION),
        }
        device = env.get(ENV_DEVICE, "").strip() or "auto"
        if device not in DEVICES:
            errors.append(f"{ENV_DEVICE} must be one of {', '.join(DEVICES)}, got {device!r}")
        if errors:
            raise ValueError("; ".join(errors))
        return cls(device=device, **values)

    def to_env(self) -> dict[str, str]:
        return {
            ENV_BASE_URI: self.base_uri,
            ENV_ADAPTERS: adapters_to_env(self.adapters),
            ENV_OUTPUT_URI: self.output_uri,
            ENV_BASE_MODEL: self.base_model,
            ENV_BASE_VERSION: str(self.base_version),
            ENV_PARENT_VERSION: "" if self.parent_version is None else str(self.parent_version),
            ENV_TARGET_VERSION: str(self.target_version),
            ENV_DEVICE: self.device,
        }

    def replace(self, **changes: Any) -> MergeJob:
        return dataclasses.replace(self, **changes)


def result_path_from_env(env: Mapping[str, str]) -> str:
    return env.get(ENV_RESULT_PATH, "").strip() or DEFAULT_RESULT_PATH


def part_size_from_env(env: Mapping[str, str]) -> int | None:
    """The optional S3 part size; None when unset. Raises ``ValueError`` naming the variable."""
    value = _int(env, ENV_PART_SIZE, optional=True)
    if value is not None and value < MIN_PART_SIZE:
        raise ValueError(f"environment variable {ENV_PART_SIZE} must be at least {MIN_PART_SIZE} (5 MiB)")
    return value


class MergeResult(BaseModel):
    """What a merge pod reports in its termination message (JSON, camelCase keys)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, frozen=True)

    status: Literal["Succeeded", "Failed"]
    version: int | None = None
    output_uri: str | None = None
    manifest_sha256: str | None = None
    total_bytes: int | None = None
    file_count: int | None = None
    adapter_seqs: list[int] | None = None  # the folded adapters' sequence numbers, in fold order
    duration_seconds: float = 0.0
    reason: str | None = None
    message: str = ""

    @property
    def succeeded(self) -> bool:
        return self.status == "Succeeded"

    def to_json(self) -> str:
        """Compact JSON that always fits ``MAX_RESULT_BYTES``; an overlong message is truncated."""
        text = self.model_dump_json(by_alias=True)
        if len(text.encode()) <= MAX_RESULT_BYTES:
            return text
        message = self.message
        overflow = len(text.encode()) - MAX_RESULT_BYTES
        # Cut by bytes (JSON escaping can make characters longer), with a visible marker.
        budget = max(0, len(json.dumps(message).encode()) - overflow - 64)
        while True:
            cut = message.encode()[:budget].decode(errors="ignore") + " …[truncated]"
            text = self.model_copy(update={"message": cut}).model_dump_json(by_alias=True)
            if len(text.encode()) <= MAX_RESULT_BYTES or budget == 0:
                return text
            budget = max(0, budget - 256)

    @classmethod
    def from_json(cls, text: str | bytes) -> MergeResult:
        return cls.model_validate_json(text)


# ---- the verify Job's termination message --------------------------------------------------------
# ``privatefm-merge verify <uri> --result-path /dev/termination-log`` (the operator's deep check)
# reports a ``VerifyResult`` there, as a merge pod reports a ``MergeResult``.

class VerifyReason(StrEnum):
    """Why a checkpoint failed verification (``VerifyResult.reason``); the first bad file decides."""

    CHECKSUM_MISMATCH = "ChecksumMismatch"  # a file's sha256 differs from the manifest's
    SIZE_MISMATCH = "SizeMismatch"          # a file's size differs from the manifest's
    FILE_MISSING = "FileMissing"            # a listed file is not there
    MANIFEST_MISSING = "ManifestMissing"    # no manifest.json: the version does not exist
    MANIFEST_INVALID = "ManifestInvalid"    # manifest.json cannot be parsed
    STORAGE_ERROR = "StorageError"          # the store could not be read: says nothing about the checkpoint


# FileProblem.reason (privatefm_merge.manifest) -> VerifyReason
PROBLEM_REASONS = {"missing": VerifyReason.FILE_MISSING, "size": VerifyReason.SIZE_MISMATCH,
                   "sha256": VerifyReason.CHECKSUM_MISMATCH, "invalid": VerifyReason.MANIFEST_INVALID}


class VerifyResult(BaseModel):
    """What a verify Job reports in its termination message (compact JSON, camelCase keys)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, frozen=True)

    status: Literal["Passed", "Failed"]
    uri: str | None = None
    reason: str | None = None          # a VerifyReason when Failed
    file: str | None = None            # the first bad file (by name)
    bad_files: int = 0                 # how many files are bad
    manifest_sha256: str | None = None
    file_count: int | None = None
    total_bytes: int | None = None
    message: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "Passed"

    def to_json(self) -> str:
        """Compact JSON that always fits ``MAX_RESULT_BYTES``; an overlong message is cut."""
        text = self.model_dump_json(by_alias=True)
        if len(text.encode()) <= MAX_RESULT_BYTES or not self.message:
            return text
        keep = max(0, len(self.message.encode()) - (len(text.encode()) - MAX_RESULT_BYTES) - 64)
        cut = self.message.encode()[:keep].decode(errors="ignore") + " …[truncated]" if keep else ""
        return self.model_copy(update={"message": cut}).to_json()

    @classmethod
    def from_json(cls, text: str | bytes) -> VerifyResult:
        return cls.model_validate_json(text)
