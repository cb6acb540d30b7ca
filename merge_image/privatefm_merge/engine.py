"""The streaming merge: base safetensors + PEFT LoRA adapter -> a new, hash-listed checkpoint.

Plan first, then stream:

1. **Plan** (reads only small things: headers, configs, listings). Refuse an output under
   ``base/``; parse the adapter config and every shard header; map each adapter module to its
   base tensor and check dtypes and shapes. Any problem fails here, before a byte is written.
2. **Stream** each base shard in file order. The output shard reuses the base shard's header
   verbatim (same names, dtypes, shapes, offsets); unadapted tensors are copied through in
   chunks, adapted tensors are read whole (one at a time), merged in place, and passed on. Two
   threads hash and write (or upload, as a multipart upload) while the next tensor is merged.
   Memory: one adapted tensor being merged plus one being written, four 16 MiB copy buffers,
   and a float32 scratch block, all reused.
3. **Commit**: check every written object's size in a fresh listing, then write
   ``manifest.json`` last. Until it exists, the version does not exist. On failure the files
   written so far are deleted (best effort) and no manifest is written.
"""

from __future__ import annotations

import contextlib
import functools
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from privatefm_merge import TOOL_NAME, layout, tool_version
from privatefm_merge.adapter import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    LoraSettings,
    TensorPlan,
    adapter_invalid,
    parse_adapter_config,
    plan_merge,
)
from privatefm_merge.clock import rfc3339
from privatefm_merge.contract import Reason
from privatefm_merge.errors import MergeError, NotFoundError, StorageError
from privatefm_merge.lora_math import NonFiniteError, Workspace, merge_lora_, resolve_device, tensor_view
from privatefm_merge.manifest import (
    AdapterInfo,
    BaseInfo,
    FileEntry,
    Manifest,
    ManifestInvalid,
    ToolInfo,
    check_sizes,
    parse_manifest,
    sha256_hex,
    summary_from_adapter_config,
)
from privatefm_merge.safetensors_io import (
    INDEX_NAME,
    SINGLE_NAME,
    SafetensorsError,
    SafetensorsHeader,
    parse_index,
    read_header,
)
from privatefm_merge.store import (
    DEFAULT_PART_SIZE,
    FileDigest,
    ObjectWriter,
    ReadStream,
    Store,
    open_store,
)

MiB = 1024 * 1024
COPY_CHUNK = 16 * MiB
# Files in a base directory that are never copied: other weight formats would hold the
# *unmerged* weights next to the merged ones.
SKIPPED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".safetensors")

ProgressFn = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True)
class MergeOptions:
    device: str = "auto"
    version: int | None = None
    parent_version: int | None = None
    base_model: str | None = None
    base_version: int | None = None
    block_elements: int | None = None  # None: a default per device
    compute_threads: int | None = None  # CPU threads for the math; None: all cores but one (min 2)
    part_size: int = DEFAULT_PART_SIZE
    progress: ProgressFn | None = None


@dataclass
class MergeSummary:
    output_uri: str
    manifest: Manifest
    manifest_sha256: str
    already_committed: bool = False
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return self.manifest.total_bytes

    @property
    def file_count(self) -> int:
        return len(self.manifest.files)


@dataclass
class _Shard:
    name: str
    header: SafetensorsHeader


@dataclass
class _Plan:
    shards: list[_Shard]
    index_name: str | None
    extra_files: list[str]  # small non-weight files copied verbatim (config.json, tokenizer…)
    tensors: dict[str, TensorPlan]  # base tensor name -> how to merge it
    settings: LoraSettings
    adapter_config: dict[str, Any]
    adapter_header: SafetensorsHeader
    adapter_files: list[FileEntry]
    base_manifest_sha256: str | None


# ---------------------------------------------------------------------------------------------
# Guards


def _local_resolved(uri: str) -> str:
    return uri if layout.is_s3_uri(uri) else str(Path(uri.removeprefix("file://")).resolve())


def check_output_allowed(output_uri: str, *inputs: str) -> None:
    """Refuse an output under ``base/`` (the shared, read-only models) or overlapping an input."""
    output = _local_resolved(output_uri)
    if layout.is_under_base(output_uri) or layout.is_under_base(output):
        raise MergeError(Reason.OUTPUT_FORBIDDEN, f"refusing to write under the base/ prefix: {output_uri}")
    for uri in inputs:
        source = _local_resolved(uri)
        if layout.is_s3_uri(source) != layout.is_s3_uri(output):
            continue
        a, b = source.rstrip("/") + "/", output.rstrip("/") + "/"
        if a.startswith(b) or b.startswith(a):
            raise MergeError(Reason.OUTPUT_FORBIDDEN, f"output {output_uri} overlaps input {uri}")


# ---------------------------------------------------------------------------------------------
# Planning


def _plan(base: Store, adapter: Store) -> _Plan:
    # The adapter.
    try:
        config_bytes = adapter.read_bytes(ADAPTER_CONFIG_NAME)
    except NotFoundError:
        raise adapter_invalid(f"{adapter.uri} has no {ADAPTER_CONFIG_NAME}") from None
    settings, adapter_config = parse_adapter_config(config_bytes)
    if not adapter.exists(ADAPTER_WEIGHTS_NAME):
        other = "adapter_model.bin" if adapter.exists("adapter_model.bin") else None
        hint = " (only safetensors adapters are supported; found adapter_model.bin)" if other else ""
        raise adapter_invalid(f"{adapter.uri} has no {ADAPTER_WEIGHTS_NAME}{hint}")
    try:
        adapter_header = read_header(adapter, ADAPTER_WEIGHTS_NAME)
    except SafetensorsError as err:
        raise adapter_invalid(str(err)) from None
    adapter_files = [
        FileEntry(name=ADAPTER_CONFIG_NAME, size=len(config_bytes), sha256=sha256_hex(config_bytes)),
        FileEntry.of(adapter.digest(ADAPTER_WEIGHTS_NAME)),
    ]

    # The base.
    listing = {info.name: info.size for info in base.list_files()}
    base_manifest_sha256 = None
    if layout.MANIFEST_NAME in listing:
        manifest_bytes = base.read_bytes(layout.MANIFEST_NAME)
        base_manifest_sha256 = sha256_hex(manifest_bytes)
        try:
            problems = check_sizes(parse_manifest(manifest_bytes), listing)
        except ManifestInvalid as err:
            raise MergeError(Reason.BASE_INVALID, f"base {base.uri}: {err}") from None
        if problems:
            raise MergeError(Reason.BASE_INVALID, f"base {base.uri} does not match its manifest: "
                                                  + "; ".join(str(p) for p in problems[:5]))
    try:
        if INDEX_NAME in listing:
            index_name: str | None = INDEX_NAME
            weight_map = parse_index(base.read_bytes(INDEX_NAME))
            shard_names = sorted(set(weight_map.values()))
        elif SINGLE_NAME in listing:
            index_name, weight_map, shard_names = None, {}, [SINGLE_NAME]
        else:
            raise MergeError(Reason.BASE_INVALID,
                             f"base {base.uri} has neither {SINGLE_NAME} nor {INDEX_NAME}")
        missing = [s for s in shard_names if s not in listing]
        if missing:
            raise MergeError(Reason.BASE_INVALID,
                             f"base {base.uri} lacks shards named in its index: {missing}")
        shards = [_Shard(name, read_header(base, name)) for name in shard_names]
    except SafetensorsError as err:
        raise MergeError(Reason.BASE_INVALID, f"base {base.uri}: {err}") from None

    all_tensors = {}
    for shard in shards:
        for name, info in shard.header.tensors.items():
            if name in all_tensors:
                raise MergeError(Reason.BASE_INVALID, f"base tensor {name} appears in two shards")
            if weight_map and weight_map.get(name) != shard.name:
                raise MergeError(Reason.BASE_INVALID, f"base index places {name} in {weight_map.get(name)}, "
                                                      f"but it is in {shard.name}")
            all_tensors[name] = info
    if weight_map and set(weight_map) != set(all_tensors):
        raise MergeError(Reason.BASE_INVALID, f"base index lists {len(weight_map)} tensors, shards hold "
                                              f"{len(all_tensors)}")

    tensors = plan_merge(settings, adapter_header.tensors, all_tensors)
    weight_files = {*shard_names, *([index_name] if index_name else [])}
    extra_files = [name for name in listing
                   if name not in weight_files and name != layout.MANIFEST_NAME
                   and not name.lower().endswith(SKIPPED_SUFFIXES)]
    return _Plan(shards, index_name, extra_files, tensors, settings, adapter_config, adapter_header,
                 adapter_files, base_manifest_sha256)


# ---------------------------------------------------------------------------------------------
# Streaming


def _read_exact_into(stream: ReadStream, view: memoryview) -> None:
    """Fill ``view`` from ``stream`` (readinto where the stream has it)."""
    filled = 0
    readinto = getattr(stream, "readinto", None)
    while filled < len(view):
        if readinto is not None:
            n = readinto(view[filled:])
        else:
            block = stream.read(len(view) - filled)
            n = len(block)
            view[filled: filled + n] = block
        if not n:
            raise StorageError(f"base shard ended early ({len(view) - filled} bytes short)")
        filled += n


class _BufferPool:
    """A fixed set of reusable (grow-only) buffers: the reader takes one, fills it, hands it to
    the writer thread, which gives it back once written. Bounds memory, and avoids the page
    faults and zero-filling of a fresh allocation per chunk."""

    def __init__(self, count: int) -> None:
        self._free: queue.Queue[bytearray] = queue.Queue()
        for _ in range(count):
            self._free.put(bytearray())
        self.wait_seconds = 0.0  # time the reader waited for the writer: the writer is the bottleneck

    def take(self, size: int) -> bytearray:
        started = time.perf_counter()
        buffer = self._free.get()  # waits while the writer holds them all
        self.wait_seconds += time.perf_counter() - started
        return buffer if len(buffer) >= size else bytearray(size)

    def give(self, buffer: bytearray) -> None:
        self._free.put(buffer)


class _BackgroundWriter:
    """Hashes on one thread and writes on another, so that both overlap reading and merging
    (on a 2-core machine the three stages balance better than two). Each queued view is handed
    back (``done``) once written; the buffer pools bound how much is in flight."""

    _STOP = object()

    def __init__(self, writer: ObjectWriter) -> None:
        self._writer = writer
        self._to_hash: queue.Queue[Any] = queue.Queue()
        self._to_write: queue.Queue[Any] = queue.Queue()
        self._error: BaseException | None = None
        self._threads = [
            threading.Thread(target=self._stage, args=(self._to_hash, writer.hash, self._to_write),
                             name=f"hash:{writer.name}", daemon=True),
            threading.Thread(target=self._stage, args=(self._to_write, writer.write_unhashed, None),
                             name=f"write:{writer.name}", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _stage(self, source: queue.Queue[Any], work: Callable[[Any], None], sink: queue.Queue[Any] | None) -> None:
        while True:
            item = source.get()
            if item is not self._STOP and self._error is None:
                try:
                    work(item[0])
                except BaseException as err:
                    self._error = err
            if sink is not None:
                sink.put(item)
            elif item is not self._STOP and item[1] is not None:
                item[1]()  # give the buffer back (after a failure too: the producer must not wait forever)
            if item is self._STOP:
                return

    def write(self, data: bytes | memoryview, done: Callable[[], None] | None = None) -> None:
        if self._error is not None:
            raise self._error
        self._to_hash.put((data, done))

    def _join(self) -> None:
        self._to_hash.put(self._STOP)
        for thread in self._threads:
            thread.join()

    def commit(self) -> FileDigest:
        self._join()
        if self._error is not None:
            self._writer.abort()
            raise self._error
        return self._writer.commit()

    def abort(self) -> None:
        self._error = self._error or RuntimeError("aborted")
        self._join()
        self._writer.abort()


class _Merger:
    def __init__(self, plan: _Plan, base: Store, adapter: Store, out: Store, options: MergeOptions) -> None:
        self.plan = plan
        self.base = base
        self.adapter = adapter
        self.out = out
        self.options = options
        self.device = resolve_device(options.device)
        self.block_elements = options.block_elements or (
            64 * MiB if self.device.type == "cuda" else 4 * MiB)
        self.written: list[FileDigest] = []
        self.chunks = _BufferPool(4)  # copied bytes, COPY_CHUNK each
        self.tensors = _BufferPool(2)  # adapted tensors: one being merged, one being written
        self.workspace = Workspace()
        self.compute_seconds = 0.0
        self.read_seconds = 0.0
        self.bytes_done = 0
        self.total_bytes = sum(s.header.file_size for s in plan.shards)
        self._last_progress = time.monotonic()

    def _progress(self, event: str, **fields: Any) -> None:
        if self.options.progress is not None:
            self.options.progress(event, fields)

    def _adapter_tensor(self, name: str) -> torch.Tensor:
        info = self.plan.adapter_header.tensors[name]
        start = self.plan.adapter_header.data_start
        raw = bytearray(self.adapter.read_range(ADAPTER_WEIGHTS_NAME, start + info.begin, start + info.end))
        return tensor_view(raw, info.dtype, info.shape)

    def _merge_tensor(self, buffer: memoryview, tensor_plan: TensorPlan, dtype: str,
                      shape: tuple[int, ...]) -> None:
        lora_a = self._adapter_tensor(tensor_plan.lora_a)
        lora_b = self._adapter_tensor(tensor_plan.lora_b)
        magnitude = self._adapter_tensor(tensor_plan.magnitude) if tensor_plan.magnitude else None
        started = time.perf_counter()
        try:
            merge_lora_(tensor_view(buffer, dtype, shape), lora_a, lora_b, tensor_plan.scaling,
                        fan_in_fan_out=tensor_plan.fan_in_fan_out, magnitude=magnitude, device=self.device,
                        block_elements=self.block_elements, workspace=self.workspace)
        except NonFiniteError as err:
            raise MergeError(Reason.NON_FINITE_RESULT,
                             f"merging {tensor_plan.module} into {tensor_plan.base_name}: {err}") from None
        self.compute_seconds += time.perf_counter() - started

    def _stream_shard(self, shard: _Shard) -> FileDigest:
        header = shard.header
        writer = _BackgroundWriter(self.out.open_write(shard.name, size_hint=header.file_size))
        stream = self.base.open_read(shard.name)
        try:
            raw = bytearray(header.data_start)
            _read_exact_into(stream, memoryview(raw))
            if raw != header.raw:
                raise StorageError(f"base shard {shard.name} changed while merging (header differs)")
            writer.write(header.raw)
            position = 0
            for info in header.tensors.values():
                self._copy(stream, writer, info.begin - position)  # gaps, if any
                tensor_plan = self.plan.tensors.get(info.name)
                if tensor_plan is None:
                    self._copy(stream, writer, info.nbytes)
                else:
                    buffer = self.tensors.take(info.nbytes)
                    view = memoryview(buffer)[: info.nbytes]
                    try:
                        self._read(stream, view)
                        self._merge_tensor(view, tensor_plan, info.dtype, info.shape)
                    except BaseException:
                        self.tensors.give(buffer)
                        raise
                    writer.write(view, functools.partial(self.tensors.give, buffer))
                    self.bytes_done += info.nbytes
                position = info.end
            if stream.read(1):
                raise StorageError(f"base shard {shard.name} is longer than its header describes")
            digest = writer.commit()
        except BaseException:
            writer.abort()
            raise
        finally:
            stream.close()
        return digest

    def _read(self, stream: ReadStream, view: memoryview) -> None:
        started = time.perf_counter()
        _read_exact_into(stream, view)
        self.read_seconds += time.perf_counter() - started

    def _copy(self, stream: ReadStream, writer: _BackgroundWriter, size: int) -> None:
        while size > 0:
            n = min(size, COPY_CHUNK)
            buffer = self.chunks.take(COPY_CHUNK)
            view = memoryview(buffer)[:n]
            try:
                self._read(stream, view)
            except BaseException:
                self.chunks.give(buffer)
                raise
            writer.write(view, functools.partial(self.chunks.give, buffer))
            size -= n
            self.bytes_done += n
            now = time.monotonic()
            if now - self._last_progress >= 10:
                self._last_progress = now
                self._progress("progress", bytes_done=self.bytes_done, bytes_total=self.total_bytes)

    def _copy_file(self, name: str) -> FileDigest:
        stream = self.base.open_read(name)
        writer = self.out.open_write(name, size_hint=self.base.stat(name))
        try:
            while block := stream.read(COPY_CHUNK):
                writer.write(block)
            return writer.commit()
        except BaseException:
            writer.abort()
            raise
        finally:
            stream.close()

    def run(self) -> list[FileDigest]:
        threads = torch.get_num_threads()
        if self.device.type == "cpu":
            # Leave a core to the threads that hash and write, except on the smallest machines,
            # where (measured on 2 cores) the math still gains from both.
            cores = len(os.sched_getaffinity(0))
            torch.set_num_threads(self.options.compute_threads or (cores if cores <= 2 else cores - 1))
        try:
            return self._run()
        finally:
            torch.set_num_threads(threads)

    def _run(self) -> list[FileDigest]:
        for number, shard in enumerate(self.plan.shards, 1):
            started = time.perf_counter()
            digest = self._stream_shard(shard)
            self.written.append(digest)
            self._progress("shard_written", shard=shard.name, number=number, of=len(self.plan.shards),
                           bytes=digest.size, seconds=round(time.perf_counter() - started, 3))
        for name in ([self.plan.index_name] if self.plan.index_name else []) + self.plan.extra_files:
            self.written.append(self._copy_file(name))
        return self.written


# ---------------------------------------------------------------------------------------------
# Entry point


def _existing_commit(out: Store, plan: _Plan, base_uri: str, options: MergeOptions) -> MergeSummary | None:
    """An identical merge already committed here (a retried Job) is a success; anything else
    committed here is an error: checkpoints are immutable."""
    try:
        data = out.read_bytes(layout.MANIFEST_NAME)
    except NotFoundError:
        return None
    try:
        manifest = parse_manifest(data)
    except ManifestInvalid:
        manifest = None
    same = (manifest is not None and manifest.base is not None and manifest.adapter is not None
            and manifest.base.uri == base_uri and manifest.version == options.version
            and [(f.name, f.sha256) for f in manifest.adapter.files]
            == [(f.name, f.sha256) for f in plan.adapter_files]
            and not check_sizes(manifest, {i.name: i.size for i in out.list_files()}))
    if not same or manifest is None:
        raise MergeError(Reason.OUTPUT_EXISTS,
                         f"{out.uri} already holds a committed checkpoint (manifest.json) from a different "
                         "merge; checkpoints are immutable")
    return MergeSummary(out.uri, manifest, sha256_hex(data), already_committed=True)


def merge_checkpoint(base_uri: str, adapter_uri: str, output_uri: str, options: MergeOptions | None = None, *,
                     s3_client: Any = None) -> MergeSummary:
    """Merge the adapter at ``adapter_uri`` into the base at ``base_uri``, writing a committed
    checkpoint at ``output_uri``. Raises ``MergeError`` for every expected failure."""
    options = options or MergeOptions()
    timings: dict[str, float] = {}
    started = time.perf_counter()
    check_output_allowed(output_uri, base_uri, adapter_uri)
    try:
        resolve_device(options.device)
    except (RuntimeError, ValueError) as err:
        raise MergeError(Reason.CONFIG_INVALID, str(err)) from None
    base = open_store(base_uri, s3_client)
    adapter = open_store(adapter_uri, s3_client)
    out = open_store(output_uri, s3_client, part_size=options.part_size)

    plan = _plan(base, adapter)
    existing = _existing_commit(out, plan, base.uri, options)
    if existing is not None:
        return existing
    timings["plan_seconds"] = time.perf_counter() - started
    if options.progress:
        options.progress("planned", {
            "shards": len(plan.shards), "adapted_tensors": len(plan.tensors),
            "bytes": sum(s.header.file_size for s in plan.shards),
            "seconds": round(timings["plan_seconds"], 3)})

    merger = _Merger(plan, base, adapter, out, options)
    try:
        stream_started = time.perf_counter()
        files = merger.run()
        timings["stream_seconds"] = time.perf_counter() - stream_started
        timings["compute_seconds"] = merger.compute_seconds
        timings["read_seconds"] = merger.read_seconds
        timings["wait_for_writer_seconds"] = merger.chunks.wait_seconds + merger.tensors.wait_seconds

        commit_started = time.perf_counter()
        entries = [FileEntry(name=d.name, size=d.size, sha256=d.sha256) for d in files]
        listing = {info.name: info.size for info in out.list_files()}
        manifest = Manifest(
            tool=ToolInfo(name=TOOL_NAME, version=tool_version()),
            created_at=rfc3339(),
            version=options.version,
            parent_version=options.parent_version,
            base=BaseInfo(uri=base.uri, model=options.base_model, version=options.base_version,
                          manifest_sha256=plan.base_manifest_sha256),
            adapter=AdapterInfo(uri=adapter.uri, files=plan.adapter_files,
                                config=summary_from_adapter_config(plan.adapter_config)),
            files=entries,
        )
        problems = check_sizes(manifest, listing)
        if problems:
            raise MergeError(Reason.VERIFICATION_FAILED, "written files do not match what was hashed: "
                             + "; ".join(str(p) for p in problems[:5]))
        data = manifest.to_bytes()
        out.put_bytes(layout.MANIFEST_NAME, data)  # the commit point
        timings["commit_seconds"] = time.perf_counter() - commit_started
    except BaseException:
        for digest in merger.written:  # nothing committed: leave no half checkpoint behind
            with contextlib.suppress(Exception):  # best effort: without a manifest they are invisible
                out.delete(digest.name)
        raise
    timings["total_seconds"] = time.perf_counter() - started
    return MergeSummary(out.uri, manifest, sha256_hex(data), timings=timings)
