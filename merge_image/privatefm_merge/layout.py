"""The storage layout of the store (bucket). Pure string functions, no I/O.

```
base/<model>/v<k>/                  model-*.safetensors, config.json, manifest.json
learners/<nsUid>/adapters/<seq>/    adapter_config.json, adapter_model.safetensors
learners/<nsUid>/events/            append-only adapter/merge log
learners/<nsUid>/checkpoints/v<N>/  model-*.safetensors, manifest.json
```

Prefixes are returned without leading or trailing slashes.
"""

from __future__ import annotations

import posixpath
import re

BASE_ROOT = "base"
LEARNERS_ROOT = "learners"
MANIFEST_NAME = "manifest.json"

_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _segment(value: str, what: str) -> str:
    if not _SEGMENT.match(value) or value in (".", ".."):
        raise ValueError(f"invalid {what} {value!r}: use letters, digits, '.', '_' or '-'")
    return value


def _version(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"invalid {what} {value!r}: must be a non-negative integer")
    return value


def base_prefix(model: str, version: int) -> str:
    return f"{BASE_ROOT}/{_segment(model, 'model name')}/v{_version(version, 'base version')}"


def learner_prefix(ns_uid: str) -> str:
    return f"{LEARNERS_ROOT}/{_segment(ns_uid, 'nsUid')}"


def adapter_prefix(ns_uid: str, seq: int) -> str:
    return f"{learner_prefix(ns_uid)}/adapters/{_version(seq, 'adapter sequence')}"


def events_prefix(ns_uid: str) -> str:
    return f"{learner_prefix(ns_uid)}/events"


def checkpoint_prefix(ns_uid: str, version: int) -> str:
    return f"{learner_prefix(ns_uid)}/checkpoints/v{_version(version, 'checkpoint version')}"


def s3_uri(bucket: str, key_prefix: str) -> str:
    return f"s3://{bucket}/{key_prefix.strip('/')}"


def is_s3_uri(uri: str) -> bool:
    return uri.startswith("s3://")


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b/`` -> ``("bucket", "a/b")``. The key prefix has no surrounding slashes."""
    if not is_s3_uri(uri):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    rest = uri[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"s3 URI has no bucket: {uri!r}")
    key = key.strip("/")
    if any(part in ("", ".", "..") for part in key.split("/")) and key:
        raise ValueError(f"s3 URI has an empty, '.' or '..' path segment: {uri!r}")
    return bucket, key


def path_components(uri_or_key: str) -> list[str]:
    """The path segments of an S3 URI's key, an S3 key, or a local path (``..`` collapsed)."""
    if is_s3_uri(uri_or_key):
        _, key = parse_s3_uri(uri_or_key)
        return [p for p in key.split("/") if p]
    return [p for p in posixpath.normpath(uri_or_key).split("/") if p not in ("", ".")]


def is_under_base(uri_or_key: str) -> bool:
    """True when the location is, or is inside, a ``base/`` directory of the store.

    Deliberately conservative: any path segment named ``base`` counts, so the rule holds
    whatever root the store sits at (a bucket, a key prefix inside a bucket, a local directory).
    Callers with a local path should pass it resolved (symlinks followed).
    """
    return BASE_ROOT in path_components(uri_or_key)
