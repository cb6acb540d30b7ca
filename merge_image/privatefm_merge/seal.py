"""Checkpoints made without a merge. Torch-free.

* ``seal_checkpoint``: write ``manifest.json`` for files that have none yet, e.g. a base model
  uploaded to ``base/<model>/v<k>/`` by hand (hashes every file by streaming).
* ``clone_checkpoint``: copy a committed checkpoint (e.g. the latest base) to a new version with
  server-side copies, no bytes through this process, and commit it with a manifest of its own
  (the operator's fallback re-clone).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from privatefm_merge import TOOL_NAME, layout, tool_version
from privatefm_merge.clock import rfc3339
from privatefm_merge.contract import Reason
from privatefm_merge.errors import MergeError
from privatefm_merge.layout import MANIFEST_NAME
from privatefm_merge.manifest import BaseInfo, FileEntry, Manifest, ToolInfo, check_sizes, composite_only, sha256_hex
from privatefm_merge.store import CHECKSUM_ALGORITHM, Store, open_store
from privatefm_merge.verify import ManifestNotFound, read_manifest


def _entry(store: Store, name: str) -> FileEntry:
    """A manifest entry for a file already in the store, with the checksum the store kept."""
    digest = store.digest(name)
    stat = store.head(name)
    checksum = stat.checksum if stat is not None and stat.algorithm == CHECKSUM_ALGORITHM else None
    return FileEntry(name=name, size=digest.size, sha256=digest.sha256,
                     store_checksum=composite_only(digest.sha256, checksum))


def seal_checkpoint(uri: str, *, version: int | None = None, s3_client: Any = None,
                    workers: int = 4) -> tuple[Manifest, str]:
    """Hash every file at ``uri`` and write its manifest last; returns (manifest, its sha256).
    Refuses when a manifest already exists (a committed version is immutable)."""
    store = open_store(uri, s3_client)
    names = [info.name for info in store.list_files()]
    if MANIFEST_NAME in names:
        raise MergeError(Reason.OUTPUT_EXISTS, f"{uri} already has a {MANIFEST_NAME}")
    if not names:
        raise MergeError(Reason.BASE_INVALID, f"{uri} holds no files")
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="seal") as pool:
        files = list(pool.map(lambda name: _entry(store, name), names))
    manifest = Manifest(tool=ToolInfo(name=TOOL_NAME, version=tool_version()), created_at=rfc3339(),
                        version=version, files=files)
    data = manifest.to_bytes()
    store.put_bytes(MANIFEST_NAME, data)
    return manifest, sha256_hex(data)


def clone_checkpoint(source_uri: str, target_uri: str, *, version: int | None = None,
                     parent_version: int | None = None, base_model: str | None = None,
                     base_version: int | None = None, s3_client: Any = None) -> tuple[Manifest, str]:
    """Copy every file the source's manifest lists to ``target_uri`` (S3 CopyObject when both
    are on the same endpoint), then commit the target with its own manifest, written last. The
    files keep their sha256 (a copy does not change bytes), so nothing is rehashed; the new
    manifest names the source as its base. Returns (manifest, its sha256).

    Refuses a target under ``base/`` and a target that already has a manifest.
    """
    if layout.is_under_base(target_uri):
        raise MergeError(Reason.OUTPUT_FORBIDDEN, f"refusing to write under the base/ prefix: {target_uri}")
    source = open_store(source_uri, s3_client)
    target = open_store(target_uri, s3_client)
    try:
        source_manifest, source_sha = read_manifest(source_uri, store=source)
    except ManifestNotFound:
        raise MergeError(Reason.BASE_INVALID, f"{source_uri}: no manifest: source version does not exist") \
            from None
    if target.exists(MANIFEST_NAME):
        raise MergeError(Reason.OUTPUT_EXISTS, f"{target_uri} already has a {MANIFEST_NAME}")
    files = []
    for entry in source_manifest.files:  # the copy's store checksum is its own (a copy recomputes it)
        stat = target.copy_from(source, entry.name)
        checksum = stat.checksum if stat.algorithm == CHECKSUM_ALGORITHM else None
        files.append(entry.model_copy(update={"store_checksum": composite_only(entry.sha256, checksum)}))
    manifest = Manifest(
        tool=ToolInfo(name=TOOL_NAME, version=tool_version()), created_at=rfc3339(), version=version,
        parent_version=parent_version, files=files,
        base=BaseInfo(uri=source.uri, model=base_model, version=base_version, manifest_sha256=source_sha))
    problems = check_sizes(manifest, {info.name: info.size for info in target.list_files()})
    if problems:
        raise MergeError(Reason.VERIFICATION_FAILED, "copied files do not match the source manifest: "
                         + "; ".join(str(p) for p in problems[:5]))
    data = manifest.to_bytes()
    target.put_bytes(MANIFEST_NAME, data)
    return manifest, sha256_hex(data)
