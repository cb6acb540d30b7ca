"""``manifest.json``: the commit point of a checkpoint, and pure checks on it.

A checkpoint version exists exactly when its ``manifest.json`` exists. The manifest is written
last and lists every other file of the checkpoint with its size and sha256. A merged checkpoint's
manifest also names its base and the adapters it folded (``adapters``, ``adapterSeqs``); a base
model's own manifest (``privatefm-merge seal``) has neither. Older manifests with a single
``adapter`` object still read (as a one-element ``adapters``). Torch-free.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from privatefm_merge.layout import MANIFEST_NAME

if TYPE_CHECKING:
    from privatefm_merge.store import FileDigest, ObjectStat

FORMAT_VERSION = 1


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class FileEntry(_Model):
    name: str
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    # The SHA-256 checksum the store kept at upload, as S3 returns it, when it is not simply the
    # base64 of ``sha256``: a multipart upload's COMPOSITE checksum ("<base64>-<parts>"). None
    # otherwise (see ``privatefm_merge.store`` and ``check_store_checksum``).
    store_checksum: str | None = None

    @classmethod
    def of(cls, digest: FileDigest) -> FileEntry:
        return cls(name=digest.name, size=digest.size, sha256=digest.sha256,
                   store_checksum=composite_only(digest.sha256, digest.store_checksum))

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        parts = name.split("/")
        if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"unsafe file name {name!r}")
        if name == MANIFEST_NAME:
            raise ValueError("the manifest cannot list itself")
        return name


class ToolInfo(_Model):
    name: str
    version: str


class BaseInfo(_Model):
    uri: str
    model: str | None = None
    version: int | None = None
    manifest_sha256: str | None = None  # of the base's own manifest.json, when it has one


class AdapterConfigSummary(_Model):
    peft_type: str
    r: int
    lora_alpha: float
    use_rslora: bool = False
    use_dora: bool = False
    fan_in_fan_out: bool = False
    target_modules: list[str] | str | None = None
    rank_pattern: dict[str, int] = Field(default_factory=dict)
    alpha_pattern: dict[str, float] = Field(default_factory=dict)


class AdapterInfo(_Model):
    uri: str
    files: list[FileEntry]
    config: AdapterConfigSummary
    mode: str | None = None  # "cumulative" or "incremental" (adapter_log.AdapterMode); None: older manifests


class Manifest(_Model):
    format_version: Literal[1] = 1
    tool: ToolInfo
    created_at: str
    version: int | None = None
    parent_version: int | None = None
    base: BaseInfo | None = None  # None for a base model's own manifest
    # The folded adapters, in fold order, and their sequence numbers in the learner's log; None
    # for a base model's own manifest.
    adapters: list[AdapterInfo] | None = None
    adapter_seqs: list[int] | None = None
    # Manifests written before adapter logs had one adapter here; read into ``adapters`` and
    # never written.
    adapter: AdapterInfo | None = Field(default=None, exclude=True)
    files: list[FileEntry]

    @model_validator(mode="after")
    def _single_adapter(self) -> Manifest:
        if self.adapter is not None:
            if self.adapters is None:
                self.adapters = [self.adapter]
            self.adapter = None
        return self

    @field_validator("files")
    @classmethod
    def _unique(cls, files: list[FileEntry]) -> list[FileEntry]:
        names = [f.name for f in files]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"files listed twice: {duplicates}")
        return files

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_bytes(self) -> bytes:
        """The exact bytes written as ``manifest.json`` (stable key order, trailing newline)."""
        return (self.model_dump_json(by_alias=True, indent=2) + "\n").encode()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ManifestInvalid(ValueError):
    """manifest.json exists but cannot be parsed or validated."""


def parse_manifest(data: bytes) -> Manifest:
    try:
        return Manifest.model_validate_json(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        count = err.error_count()
        raise ManifestInvalid(f"invalid manifest.json: {where}: {first['msg']} ({count} errors)") from None


@dataclass(frozen=True)
class FileProblem:
    name: str
    reason: Literal["missing", "size", "sha256", "invalid"]
    detail: str

    def __str__(self) -> str:
        return f"{self.name}: {self.detail}"


def check_sizes(manifest: Manifest, sizes: Mapping[str, int]) -> list[FileProblem]:
    """Existence and size of every listed file, given the store's listing (name -> size)."""
    problems = []
    for entry in manifest.files:
        actual = sizes.get(entry.name)
        if actual is None:
            problems.append(FileProblem(entry.name, "missing", "missing"))
        elif actual != entry.size:
            problems.append(FileProblem(entry.name, "size",
                                        f"size mismatch: expected {entry.size} bytes, found {actual}"))
    return problems


def check_digest(entry: FileEntry, size: int, sha256: str) -> FileProblem | None:
    if size != entry.size:
        return FileProblem(entry.name, "size", f"size mismatch: expected {entry.size} bytes, read {size}")
    if sha256 != entry.sha256:
        return FileProblem(entry.name, "sha256", f"sha256 mismatch: expected {entry.sha256}, got {sha256}")
    return None


def full_object_checksum(sha256: str) -> str:
    """The S3 SHA-256 checksum of a whole object (single PUT or CopyObject) with this sha256."""
    return base64.b64encode(bytes.fromhex(sha256)).decode()


def composite_only(sha256: str, store_checksum: str | None) -> str | None:
    """What a manifest records of a store checksum: nothing when it follows from the sha256."""
    return None if store_checksum in (None, full_object_checksum(sha256)) else store_checksum


def store_checksum_checkable(entry: FileEntry, stat: ObjectStat) -> bool:
    """Whether the store kept a checksum that ``check_store_checksum`` can compare for this file:
    SHA-256, full-object, or composite where the manifest recorded the composite value."""
    if stat.algorithm != "SHA256" or not stat.checksum:
        return False
    return entry.store_checksum is not None or "-" not in stat.checksum


def check_store_checksum(entry: FileEntry, stat: ObjectStat) -> FileProblem | None:
    """The cheap check of one file against the checksum the store kept (no object bytes read).

    Where the store kept a SHA-256 checksum: a recorded COMPOSITE one must equal it exactly; a
    full-object one must be the file's sha256. A composite checksum the manifest did not record
    (an older manifest), another algorithm, or no checksum at all cannot be checked: None.
    """
    if stat.algorithm != "SHA256" or not stat.checksum:
        return None
    if entry.store_checksum is not None:
        expected = entry.store_checksum
    elif "-" not in stat.checksum:  # FULL_OBJECT
        expected = full_object_checksum(entry.sha256)
    else:
        return None
    if stat.checksum != expected:
        return FileProblem(entry.name, "sha256", f"store checksum mismatch: the manifest implies SHA256 "
                                                 f"{expected}, the store kept {stat.checksum}")
    return None


def summary_from_adapter_config(config: Mapping[str, Any]) -> AdapterConfigSummary:
    """The manifest's summary of a PEFT ``adapter_config.json``."""
    target = config.get("target_modules")
    return AdapterConfigSummary(
        peft_type=str(config.get("peft_type", "")),
        r=int(config.get("r", 0)),
        lora_alpha=float(config.get("lora_alpha", 0)),
        use_rslora=bool(config.get("use_rslora", False)),
        use_dora=bool(config.get("use_dora", False)),
        fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
        target_modules=sorted(target) if isinstance(target, list | set | tuple) else target,
        rank_pattern=dict(config.get("rank_pattern") or {}),
        alpha_pattern=dict(config.get("alpha_pattern") or {}),
    )
