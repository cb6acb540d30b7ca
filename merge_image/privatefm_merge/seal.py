"""Write ``manifest.json`` for a checkpoint that has none yet, e.g. a base model uploaded to
``base/<model>/v<k>/`` by hand. Hashes every file by streaming. Torch-free."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from privatefm_merge import TOOL_NAME, tool_version
from privatefm_merge.contract import Reason
from privatefm_merge.errors import MergeError
from privatefm_merge.layout import MANIFEST_NAME
from privatefm_merge.manifest import FileEntry, Manifest, ToolInfo, now_rfc3339, sha256_hex
from privatefm_merge.store import Store, open_store, sha256_stream


def _entry(store: Store, name: str) -> FileEntry:
    stream = store.open_read(name)
    try:
        size, digest = sha256_stream(stream)
    finally:
        stream.close()
    return FileEntry(name=name, size=size, sha256=digest)


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
    manifest = Manifest(tool=ToolInfo(name=TOOL_NAME, version=tool_version()), created_at=now_rfc3339(),
                        version=version, files=files)
    data = manifest.to_bytes()
    store.put_bytes(MANIFEST_NAME, data)
    return manifest, sha256_hex(data)
