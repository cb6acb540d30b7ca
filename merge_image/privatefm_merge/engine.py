"""The streaming merge: base safetensors + a log of PEFT LoRA adapters -> a new, hash-listed checkpoint.

Plan first, then stream:

1. **Plan** (reads only small things: headers, configs, sidecars, listings). Refuse an output
   under ``base/``; parse every adapter's config, ``privatefm.json`` sidecar and shard header;
   check the fold order (a cumulative adapter only first); map each adapter module to its base
   tensor and check dtypes and shapes. Any such problem fails here, before a byte is written.
   The adapters' weights files are hashed for the manifest on a thread while the merge streams.
2. **Stream** each base shard once, in file order, whatever the number of adapters. The output
   shard reuses the base shard's header verbatim (same names, dtypes, shapes, offsets);
   unadapted tensors are copied through in chunks; adapted tensors are read in chunks of whole
   rows, every adapter's delta is folded into each chunk in order (in float32, rounded once),
   on a small pool of compute threads, while a hash thread and a write thread (or multipart
   upload) take the finished chunks in order. See ``_Merger``.
3. **Commit**: check every written object's size in a fresh listing, then write
   ``manifest.json`` last, listing the files and the folded adapters with their sequence
   numbers. Until it exists, the version does not exist. On failure the files written so far
   are deleted (best effort) and no manifest is written.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
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
from privatefm_merge.adapter_log import SIDECAR_NAME, AdapterMode, check_order, default_seqs, parse_sidecar
from privatefm_merge.clock import rfc3339
from privatefm_merge.contract import Reason
from privatefm_merge.errors import MergeError, NotFoundError, StorageError
from privatefm_merge.lora_math import (
    DEFAULT_BLOCK_ELEMENTS,
    ROW_ALIGN,
    Fold,
    LoraDelta,
    NonFiniteError,
    Workspace,
    resolve_device,
    tensor_view,
)
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
    TensorInfo,
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
    # The adapters' sequence numbers in the learner's log, in fold order (recorded in the manifest);
    # None: from each adapter directory's name when it is an integer, else its position.
    adapter_seqs: Sequence[int] | None = None
    block_elements: int | None = None  # None: a default per device
    compute_threads: int | None = None  # threads merging chunks side by side; None: cores - 1 (2..8)
    chunk_bytes: int = COPY_CHUNK  # adapted tensors are merged in chunks of whole rows of about this size
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
class _Adapter:
    """One adapter of the fold, planned: its store, settings, header, files and merge plan."""

    store: Store
    seq: int
    mode: AdapterMode
    settings: LoraSettings
    config: dict[str, Any]
    header: SafetensorsHeader
    small_files: list[FileEntry]  # the config and the sidecar, read whole while planning
    weights_digest: Future[FileDigest]  # hashed in the background, while the merge streams
    tensors: dict[str, TensorPlan]  # base tensor name -> how this adapter changes it

    @property
    def files(self) -> list[FileEntry]:
        """The adapter's files as the manifest lists them (waits for the weights' hash)."""
        return [self.small_files[0], FileEntry.of(self.weights_digest.result()), *self.small_files[1:]]


@dataclass
class _Plan:
    shards: list[_Shard]
    index_name: str | None
    extra_files: list[str]  # small non-weight files copied verbatim (config.json, tokenizer…)
    adapters: list[_Adapter]  # in fold order
    # base tensor name -> (adapter index, plan) for every adapter that changes it, in fold order
    tensors: dict[str, list[tuple[int, TensorPlan]]]
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


def _plan_adapter(adapter: Store, seq: int, base_tensors: dict[str, Any], hashing: ThreadPoolExecutor) -> _Adapter:
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
        sidecar: bytes | None = adapter.read_bytes(SIDECAR_NAME)
    except NotFoundError:
        sidecar = None
    try:
        mode = parse_sidecar(sidecar)
    except ValueError as err:
        raise adapter_invalid(f"{adapter.uri}: {err}") from None
    try:
        header = read_header(adapter, ADAPTER_WEIGHTS_NAME)
    except SafetensorsError as err:
        raise adapter_invalid(str(err)) from None
    small_files = [
        FileEntry(name=ADAPTER_CONFIG_NAME, size=len(config_bytes), sha256=sha256_hex(config_bytes)),
        *([FileEntry(name=SIDECAR_NAME, size=len(sidecar), sha256=sha256_hex(sidecar))] if sidecar else []),
    ]
    try:
        tensors = plan_merge(settings, header.tensors, base_tensors)
    except MergeError as err:
        raise MergeError(err.reason, f"adapter {adapter.uri}: {err.message}") from None
    weights_digest = hashing.submit(adapter.digest, ADAPTER_WEIGHTS_NAME)
    return _Adapter(adapter, seq, mode, settings, adapter_config, header, small_files, weights_digest, tensors)


def _fold_plans(adapters: list[_Adapter]) -> dict[str, list[tuple[int, TensorPlan]]]:
    """Per base tensor, the adapters that change it, in fold order."""
    try:
        check_order([a.mode for a in adapters])
    except ValueError as err:
        raise adapter_invalid(str(err)) from None
    tensors: dict[str, list[tuple[int, TensorPlan]]] = {}
    for number, adapter in enumerate(adapters):
        for name, tensor_plan in adapter.tensors.items():
            tensors.setdefault(name, []).append((number, tensor_plan))
    for name, plans in tensors.items():
        if len({p.fan_in_fan_out for _, p in plans}) > 1:
            raise adapter_invalid(f"the adapters disagree on fan_in_fan_out for base tensor {name}")
    return tensors


def _plan(base: Store, adapters: list[tuple[Store, int]], hashing: ThreadPoolExecutor) -> _Plan:
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

    planned = [_plan_adapter(store, seq, all_tensors, hashing) for store, seq in adapters]
    tensors = _fold_plans(planned)
    weight_files = {*shard_names, *([index_name] if index_name else [])}
    extra_files = [name for name in listing
                   if name not in weight_files and name != layout.MANIFEST_NAME
                   and not name.lower().endswith(SKIPPED_SUFFIXES)]
    return _Plan(shards, index_name, extra_files, planned, tensors, base_manifest_sha256)


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
    """Hashes on one thread and writes on another, so that both overlap reading and merging.
    Items are views, or futures of views being merged on the compute threads; both stages take
    them in order. Each queued view is handed back (``done``) once written; the buffer pools
    bound how much is in flight."""

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
            if item is self._STOP:
                if sink is not None:
                    sink.put(item)
                return
            data, done = item
            if isinstance(data, Future):  # a chunk still being merged on a compute thread: in order
                try:
                    data = data.result()
                except BaseException as err:
                    self._error = self._error or err
            if self._error is None:
                try:
                    work(data)
                except BaseException as err:
                    self._error = err
            if sink is not None:
                sink.put((data, done))
            elif done is not None:
                done()  # give the buffer back (after a failure too: the producer must not wait forever)

    def write(self, data: bytes | memoryview | Future[memoryview], done: Callable[[], None] | None = None) -> None:
        """Queue ``data`` (or the future result of merging it) to be hashed and written, in order;
        ``done`` runs once it has been written, or dropped after a failure."""
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


class _AdapterPrefetch:
    """Reads the adapter tensors for the next few adapted base tensors on a small thread pool, so
    that the store's latency (a ranged GET per adapter tensor on S3, times the adapters in the
    fold) overlaps the merge instead of adding to it."""

    LOOKAHEAD = 4  # adapted base tensors

    def __init__(self, plan: _Plan, order: list[str]) -> None:
        self._plan = plan
        self._order = iter(order)
        self._pending: collections.deque[tuple[str, list[Future[LoraDelta]]]] = collections.deque()
        self._pool = ThreadPoolExecutor(8, thread_name_prefix="adapter-read")
        self._fill()

    def _fill(self) -> None:
        while len(self._pending) < self.LOOKAHEAD:
            name = next(self._order, None)
            if name is None:
                return
            futures = [self._pool.submit(self._load, self._plan.adapters[number], tensor_plan)
                       for number, tensor_plan in self._plan.tensors[name]]
            self._pending.append((name, futures))

    @staticmethod
    def _load(adapter: _Adapter, tensor_plan: TensorPlan) -> LoraDelta:
        def tensor(name: str) -> torch.Tensor:
            info = adapter.header.tensors[name]
            start = adapter.header.data_start
            raw = bytearray(adapter.store.read_range(ADAPTER_WEIGHTS_NAME, start + info.begin, start + info.end))
            return tensor_view(raw, info.dtype, info.shape)

        magnitude = tensor(tensor_plan.magnitude) if tensor_plan.magnitude else None
        return LoraDelta(tensor(tensor_plan.lora_a), tensor(tensor_plan.lora_b), tensor_plan.scaling, magnitude)

    def get(self, name: str) -> list[LoraDelta]:
        """The deltas for base tensor ``name``; names must be asked for in streaming order."""
        self._fill()
        pending, futures = self._pending.popleft()
        assert pending == name, (pending, name)
        self._fill()
        return [future.result() for future in futures]

    def close(self) -> None:
        for _, futures in self._pending:
            for future in futures:
                future.cancel()
        self._pool.shutdown(wait=True)


class _Merger:
    """Streams the shards through the pipeline

        main thread: read a chunk ──► compute threads: merge it ──► hash thread ──► write thread

    Each adapted tensor is split into chunks of whole rows (a multiple of 64, about
    ``COPY_CHUNK`` bytes), merged independently on a small pool of compute threads (torch
    releases the GIL; each merge runs single-threaded, so no thread waits at another's barrier),
    and hashed and written in order while the next chunks are read and merged. Memory: the
    chunk buffers, a float32 scratch block per compute thread, and the adapter tensors of the
    few base tensors being merged. Tensors stored transposed (``fan_in_fan_out``) are merged
    whole, one or two at a time.
    """

    def __init__(self, plan: _Plan, base: Store, out: Store, options: MergeOptions) -> None:
        self.plan = plan
        self.base = base
        self.out = out
        self.options = options
        self.device = resolve_device(options.device)
        self.block_elements = options.block_elements or (
            64 * MiB if self.device.type == "cuda" else DEFAULT_BLOCK_ELEMENTS)
        cores = len(os.sched_getaffinity(0))
        # On the CPU, every core but one (which reads, hashes and writes), and at least two; on a
        # GPU, two threads keep it fed while the host copies.
        self.workers = options.compute_threads or (min(8, max(2, cores - 1)) if self.device.type == "cpu" else 2)
        self.written: list[FileDigest] = []
        self.chunks = _BufferPool(self.workers + 4)  # about COPY_CHUNK each: being merged, queued, hashed, written
        self.tensors = _BufferPool(2)  # whole (transposed) adapted tensors: one being merged, one written
        self.local = threading.local()  # a float32 scratch Workspace per compute thread
        self.compute_seconds = 0.0  # summed over the compute threads
        self.read_seconds = 0.0
        self.bytes_done = 0
        self.total_bytes = sum(s.header.file_size for s in plan.shards)
        self._last_progress = time.monotonic()

    def _progress(self, event: str, **fields: Any) -> None:
        if self.options.progress is not None:
            self.options.progress(event, fields)

    def _merge(self, view: memoryview, fold: Fold, name: str, dtype: str, shape: tuple[int, ...],
               first_row: int, fan_in_fan_out: bool) -> memoryview:
        """On a compute thread: fold into the rows held in ``view``; returns ``view``."""
        started = time.perf_counter()
        workspace = getattr(self.local, "workspace", None)
        if workspace is None:
            workspace = self.local.workspace = Workspace()
        try:
            fold.apply_(tensor_view(view, dtype, shape), first_row=first_row, fan_in_fan_out=fan_in_fan_out,
                        block_elements=self.block_elements, workspace=workspace)
        except NonFiniteError as err:
            module = self.plan.tensors[name][0][1].module
            raise MergeError(Reason.NON_FINITE_RESULT, f"merging {module} into {name}: {err}") from None
        finally:
            self.compute_seconds += time.perf_counter() - started
        return view

    def _merge_tensor(self, stream: ReadStream, writer: _BackgroundWriter, info: TensorInfo) -> None:
        fan_in_fan_out = self.plan.tensors[info.name][0][1].fan_in_fan_out
        fold = Fold(self.prefetch.get(info.name), self.device)
        if fan_in_fan_out:  # stored [in, out]: an output row is not contiguous, so the tensor goes whole
            self._submit(stream, writer, self.tensors, info, fold, info.nbytes, info.shape, 0, True)
            return
        rows, columns = info.shape
        row_bytes = info.nbytes // max(1, rows)
        rows_per_chunk = max(ROW_ALIGN, self.options.chunk_bytes // max(1, row_bytes) // ROW_ALIGN * ROW_ALIGN)
        for first in range(0, rows, rows_per_chunk):
            count = min(rows_per_chunk, rows - first)
            self._submit(stream, writer, self.chunks, info, fold, count * row_bytes, (count, columns), first, False)

    def _submit(self, stream: ReadStream, writer: _BackgroundWriter, pool: _BufferPool, info: TensorInfo,
                fold: Fold, size: int, shape: tuple[int, ...], first_row: int, fan_in_fan_out: bool) -> None:
        """Read the next ``size`` bytes (rows of a tensor) and queue their merge, then their hashing
        and writing."""
        buffer = pool.take(size)
        view = memoryview(buffer)[:size]
        try:
            self._read(stream, view)
            future = self.compute.submit(self._merge, view, fold, info.name, info.dtype, shape, first_row,
                                         fan_in_fan_out)
        except BaseException:
            pool.give(buffer)
            raise
        writer.write(future, functools.partial(pool.give, buffer))
        self.bytes_done += size

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
                if info.name in self.plan.tensors:
                    self._merge_tensor(stream, writer, info)
                else:
                    self._copy(stream, writer, info.nbytes)
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
        torch.set_num_threads(1)  # each compute thread merges single-threaded; they run side by side
        order = [name for shard in self.plan.shards for name in shard.header.tensors if name in self.plan.tensors]
        self.prefetch = _AdapterPrefetch(self.plan, order)
        self.compute = ThreadPoolExecutor(self.workers, thread_name_prefix="merge")
        try:
            return self._run()
        finally:
            self.compute.shutdown(wait=True, cancel_futures=True)
            self.prefetch.close()
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
    same = (manifest is not None and manifest.base is not None and manifest.adapters is not None
            and manifest.base.uri == base_uri and manifest.version == options.version
            and [[(f.name, f.sha256) for f in a.files] for a in manifest.adapters]
            == [[(f.name, f.sha256) for f in a.files] for a in plan.adapters]
            and not check_sizes(manifest, {i.name: i.size for i in out.list_files()}))
    if not same or manifest is None:
        raise MergeError(Reason.OUTPUT_EXISTS,
                         f"{out.uri} already holds a committed checkpoint (manifest.json) from a different "
                         "merge; checkpoints are immutable")
    return MergeSummary(out.uri, manifest, sha256_hex(data), already_committed=True)


def merge_checkpoint(base_uri: str, adapters: str | Sequence[str], output_uri: str,
                     options: MergeOptions | None = None, *, s3_client: Any = None) -> MergeSummary:
    """Fold the adapters at ``adapters`` (one URI, or several in fold order) into the base at
    ``base_uri`` in one streaming pass, writing a committed checkpoint at ``output_uri``.
    Raises ``MergeError`` for every expected failure."""
    options = options or MergeOptions()
    adapter_uris = [adapters] if isinstance(adapters, str) else list(adapters)
    started = time.perf_counter()
    if not adapter_uris:
        raise MergeError(Reason.CONFIG_INVALID, "no adapter to merge: give at least one")
    seqs = list(options.adapter_seqs) if options.adapter_seqs is not None else default_seqs(adapter_uris)
    if len(seqs) != len(adapter_uris):
        raise MergeError(Reason.CONFIG_INVALID, f"{len(adapter_uris)} adapters but {len(seqs)} sequence numbers")
    check_output_allowed(output_uri, base_uri, *adapter_uris)
    try:
        resolve_device(options.device)
    except (RuntimeError, ValueError) as err:
        raise MergeError(Reason.CONFIG_INVALID, str(err)) from None
    base = open_store(base_uri, s3_client)
    adapter_stores = [open_store(uri, s3_client) for uri in adapter_uris]
    out = open_store(output_uri, s3_client, part_size=options.part_size)

    # The adapters' weights are hashed (for the manifest) on a thread while the merge streams.
    with ThreadPoolExecutor(1, thread_name_prefix="adapter-hash") as hashing:
        plan = _plan(base, list(zip(adapter_stores, seqs, strict=True)), hashing)
        existing = _existing_commit(out, plan, base.uri, options)
        if existing is not None:
            return existing
        return _merge(plan, base, out, options, seqs, started)


def _merge(plan: _Plan, base: Store, out: Store, options: MergeOptions, seqs: list[int],
           started: float) -> MergeSummary:
    timings: dict[str, float] = {}
    timings["plan_seconds"] = time.perf_counter() - started
    if options.progress:
        options.progress("planned", {
            "shards": len(plan.shards), "adapters": len(plan.adapters), "adapter_seqs": seqs,
            "adapted_tensors": len(plan.tensors), "bytes": sum(s.header.file_size for s in plan.shards),
            "seconds": round(timings["plan_seconds"], 3)})

    merger = _Merger(plan, base, out, options)
    try:
        stream_started = time.perf_counter()
        files = merger.run()
        timings["stream_seconds"] = time.perf_counter() - stream_started
        timings["compute_seconds"] = merger.compute_seconds
        timings["read_seconds"] = merger.read_seconds
        timings["wait_for_writer_seconds"] = merger.chunks.wait_seconds + merger.tensors.wait_seconds

        commit_started = time.perf_counter()
        entries = [FileEntry.of(d) for d in files]
        listing = {info.name: info.size for info in out.list_files()}
        manifest = Manifest(
            tool=ToolInfo(name=TOOL_NAME, version=tool_version()),
            created_at=rfc3339(),
            version=options.version,
            parent_version=options.parent_version,
            base=BaseInfo(uri=base.uri, model=options.base_model, version=options.base_version,
                          manifest_sha256=plan.base_manifest_sha256),
            adapters=[AdapterInfo(uri=a.store.uri, files=a.files, config=summary_from_adapter_config(a.config),
                                  mode=a.mode.value) for a in plan.adapters],
            adapter_seqs=[a.seq for a in plan.adapters],
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
