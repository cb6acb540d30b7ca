"""The safetensors file format, parsed directly (torch-free).

A file is: 8 bytes little-endian header length ``n``; ``n`` bytes of JSON mapping tensor names
to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the data region),
plus an optional ``"__metadata__"``; then the data region. Because a merged tensor has the same
name, dtype and shape as the base tensor, a merged shard reuses the base shard's header bytes
verbatim and only the data of adapted tensors changes.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

from privatefm_merge.store import Store

DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's limit
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class SafetensorsError(ValueError):
    """Malformed safetensors file or index."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offsets within the data region
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    raw: bytes  # the 8-byte length and the JSON header, verbatim
    tensors: dict[str, TensorInfo]  # in data-offset order
    metadata: dict[str, str] | None

    @property
    def data_start(self) -> int:
        return len(self.raw)

    @property
    def data_size(self) -> int:
        return max((t.end for t in self.tensors.values()), default=0)

    @property
    def file_size(self) -> int:
        return self.data_start + self.data_size


def header_length(prefix: bytes) -> int:
    if len(prefix) != 8:
        raise SafetensorsError("file shorter than the 8-byte header length")
    (length,) = struct.unpack("<Q", prefix)
    if length > MAX_HEADER_BYTES:
        raise SafetensorsError(f"header length {length} exceeds {MAX_HEADER_BYTES}")
    return int(length)


def parse_header(prefix: bytes, header: bytes, *, where: str = "file") -> SafetensorsHeader:
    try:
        doc = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SafetensorsError(f"{where}: header is not JSON: {err}") from None
    if not isinstance(doc, dict):
        raise SafetensorsError(f"{where}: header is not a JSON object")
    metadata = doc.pop("__metadata__", None)
    tensors = []
    for name, entry in doc.items():
        try:
            dtype, (begin, end) = entry["dtype"], entry["data_offsets"]
            shape = tuple(int(d) for d in entry["shape"])
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"{where}: malformed entry for tensor {name!r}") from None
        if dtype not in DTYPE_SIZES:
            raise SafetensorsError(f"{where}: tensor {name!r} has unknown dtype {dtype!r}")
        info = TensorInfo(name, dtype, shape, int(begin), int(end))
        if info.nbytes != info.numel * DTYPE_SIZES[dtype] or info.begin < 0:
            raise SafetensorsError(f"{where}: tensor {name!r} offsets do not match its shape and dtype")
        tensors.append(info)
    tensors.sort(key=lambda t: (t.begin, t.end))
    position = 0
    for info in tensors:
        if info.begin < position:
            raise SafetensorsError(f"{where}: tensor {info.name!r} overlaps the previous tensor")
        position = info.end
    return SafetensorsHeader(prefix + header, {t.name: t for t in tensors}, metadata)


def read_header(store: Store, name: str) -> SafetensorsHeader:
    """Parse a safetensors file's header with two ranged reads, and check the file's size."""
    where = store.child_uri(name)
    prefix = store.read_range(name, 0, 8)
    header = store.read_range(name, 8, 8 + header_length(prefix))
    parsed = parse_header(prefix, header, where=where)
    size = store.stat(name)
    if size is not None and size != parsed.file_size:
        raise SafetensorsError(f"{where}: file is {size} bytes but its header describes {parsed.file_size}")
    return parsed


def parse_index(data: bytes, *, where: str = INDEX_NAME) -> dict[str, str]:
    """``model.safetensors.index.json`` -> weight_map (tensor name -> shard file name)."""
    try:
        doc: Any = json.loads(data)
        weight_map = doc["weight_map"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise SafetensorsError(f"{where}: not a safetensors index (no weight_map)") from None
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise SafetensorsError(f"{where}: weight_map must map tensor names to file names")
    return weight_map
