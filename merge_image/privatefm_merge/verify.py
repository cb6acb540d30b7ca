"""Checkpoint verification: is every file the manifest lists present, the right size, and
the right sha256? Torch-free, streaming, constant memory (a few read buffers).

The operator calls these from a worker thread with its own boto3 client::

    report = verify_checkpoint("s3://bucket/learners/<nsUid>/checkpoints/v7", s3_client=client)
    if not report.exists: ...      # no manifest: the version does not exist
    elif not report.ok: ...        # report.problems names each bad file
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from privatefm_merge.errors import NotFoundError
from privatefm_merge.layout import MANIFEST_NAME
from privatefm_merge.manifest import (
    FileEntry,
    FileProblem,
    Manifest,
    ManifestInvalid,
    check_digest,
    check_sizes,
    check_store_checksum,
    parse_manifest,
    sha256_hex,
    store_checksum_checkable,
)
from privatefm_merge.store import Store, open_store

NO_MANIFEST = "no manifest: version does not exist"


class ManifestNotFound(NotFoundError):
    """The checkpoint has no manifest.json: that version does not exist."""


@dataclass
class VerifyReport:
    uri: str
    exists: bool  # False: no manifest.json, so the version does not exist
    ok: bool
    message: str
    manifest: Manifest | None = None
    manifest_sha256: str | None = None
    problems: list[FileProblem] = field(default_factory=list)
    hashed: bool = True  # False when only existence and sizes were checked
    bytes_read: int = 0  # object bytes read to hash files (the manifest not counted)

    @property
    def total_bytes(self) -> int:
        return self.manifest.total_bytes if self.manifest else 0

    @property
    def file_count(self) -> int:
        return len(self.manifest.files) if self.manifest else 0

    @property
    def bad_files(self) -> list[str]:
        return [p.name for p in self.problems]


def read_manifest(uri: str, s3_client: Any = None, *, store: Store | None = None) -> tuple[Manifest, str]:
    """(manifest, sha256 of the manifest.json bytes). Raises ``ManifestNotFound`` when the
    version does not exist, ``ManifestInvalid`` when the manifest is malformed, and
    ``StorageError`` when the store cannot be read."""
    store = store or open_store(uri, s3_client)
    try:
        data = store.read_bytes(MANIFEST_NAME)
    except NotFoundError:
        raise ManifestNotFound(f"{uri}: {NO_MANIFEST}") from None
    return parse_manifest(data), sha256_hex(data)


def _hash_one(store: Store, entry: FileEntry) -> FileProblem | None:
    try:
        found = store.digest(entry.name)
    except NotFoundError:
        return FileProblem(entry.name, "missing", "missing")
    return check_digest(entry, found.size, found.sha256)


def _attested(store: Store, entries: list[FileEntry]) -> tuple[list[FileProblem], list[FileEntry]]:
    """(problems, the entries still to hash): a file whose store kept a comparable SHA-256 checksum
    (checked by the store against the bytes at upload) is checked by that checksum, one HEAD, and
    not read."""
    problems, todo = [], []
    for entry in entries:
        stat = store.head(entry.name)
        if stat is None:
            problems.append(FileProblem(entry.name, "missing", "missing"))
        elif not store_checksum_checkable(entry, stat):
            todo.append(entry)
        elif (problem := check_store_checksum(entry, stat)) is not None:
            problems.append(problem)
    return problems, todo


def verify_checkpoint(uri: str, *, s3_client: Any = None, hash_files: bool = True,
                      workers: int = 4, store: Store | None = None,
                      trust_store_checksums: bool = False) -> VerifyReport:
    """Check the checkpoint at ``uri`` against its manifest.

    With ``hash_files=False`` only existence and sizes are checked (one listing, no reads). With
    ``trust_store_checksums``, a file whose store kept a comparable SHA-256 checksum is checked by
    it (one HEAD) instead of by reading it; only the others are read and hashed (``bytes_read``).
    Storage errors (unreachable store, denied) raise ``StorageError``: they say nothing about
    the checkpoint itself.
    """
    store = store or open_store(uri, s3_client)
    try:
        manifest, digest = read_manifest(uri, store=store)
    except ManifestNotFound:
        return VerifyReport(uri, exists=False, ok=False, message=NO_MANIFEST)
    except ManifestInvalid as err:
        problem = FileProblem(MANIFEST_NAME, "invalid", str(err))
        return VerifyReport(uri, exists=True, ok=False, message=f"bad file {problem}", problems=[problem])

    sizes = {info.name: info.size for info in store.list_files()}
    problems = check_sizes(manifest, sizes)
    bytes_read = 0
    if hash_files:
        bad = {p.name for p in problems}
        todo = [entry for entry in manifest.files if entry.name not in bad]
        if trust_store_checksums:
            attested_problems, todo = _attested(store, todo)
            problems += attested_problems
        with ThreadPoolExecutor(max(1, workers), thread_name_prefix="verify") as pool:
            results = list(pool.map(lambda e: _hash_one(store, e), todo))
        problems += [p for p in results if p is not None]
        bytes_read = sum(entry.size for entry in todo)
    problems.sort(key=lambda p: p.name)
    if problems:
        message = "bad file " + "; bad file ".join(str(p) for p in problems)
    else:
        checked = "sha256-verified" if hash_files else "present with the right sizes"
        message = f"{len(manifest.files)} files ({manifest.total_bytes} bytes) {checked}"
    return VerifyReport(uri, exists=True, ok=not problems, message=message, manifest=manifest,
                        manifest_sha256=digest, problems=problems, hashed=hash_files, bytes_read=bytes_read)
