"""The only module of the operator that talks to S3, through the merge package's store.

One S3 stack: every read and write goes through ``privatefm_merge.store.S3Store``, so a store
problem is always a ``StorageError`` (it says nothing about the data itself).
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from privatefm_merge import layout
from privatefm_merge.store import S3Store, make_s3_client
from privatefm_merge.verify import VerifyReport, verify_checkpoint

from privatefm_operator.settings import Settings

BASE_CACHE_SECONDS = 10.0
_VERSION_DIR = re.compile(r"^v(\d+)$")
_SEQ_DIR = re.compile(r"^(\d+)$")


class Storage:
    def __init__(self, settings: Settings) -> None:
        self.bucket = settings.s3_bucket
        self.client = make_s3_client(settings.s3_endpoint, settings.s3_region, settings.s3_access_key,
                                     settings.s3_secret_key)
        self.root = S3Store(self.client, self.bucket, "")
        self._latest: dict[str, tuple[float, int | None]] = {}

    def uri(self, key_prefix: str) -> str:
        return layout.s3_uri(self.bucket, key_prefix)

    def _at(self, key_prefix: str) -> S3Store:
        return S3Store(self.client, self.bucket, key_prefix)

    def latest_base_version(self, model: str) -> int | None:
        """Newest published base version, remembered for ``BASE_CACHE_SECONDS``: every learner of a
        model asks on every resync, and a new base version is a rare event."""
        cached = self._latest.get(model)
        if cached and time.monotonic() - cached[0] < BASE_CACHE_SECONDS:
            return cached[1]
        version = self._find_latest_base_version(model)
        self._latest[model] = (time.monotonic(), version)
        return version

    def _find_latest_base_version(self, model: str) -> int | None:
        versions = sorted((int(m.group(1)) for d in self.root.list_dirs(f"{layout.BASE_ROOT}/{model}")
                           if (m := _VERSION_DIR.match(d))), reverse=True)
        return next((v for v in versions if self.base_exists(model, v)), None)

    def base_exists(self, model: str, version: int) -> bool:
        """A version exists once its manifest (the commit point) does."""
        return self.root.exists(f"{layout.base_prefix(model, version)}/{layout.MANIFEST_NAME}")

    def latest_adapter_seq(self, ns_uid: str) -> int | None:
        seqs = [int(m.group(1)) for d in self.root.list_dirs(f"{layout.learner_prefix(ns_uid)}/adapters")
                if (m := _SEQ_DIR.match(d))]
        return max(seqs) if seqs else None

    def verify(self, key_prefix: str) -> VerifyReport:
        """Rehash the checkpoint at ``key_prefix`` against its manifest."""
        return verify_checkpoint(self.uri(key_prefix), store=self._at(key_prefix))

    def append_event(self, ns_uid: str, kind: str, record: dict[str, Any]) -> None:
        """Append-only learner log (the replay source): one object per event, ordered by key."""
        name = f"{layout.events_prefix(ns_uid)}/{time.time_ns():020d}-{kind}.json"
        self.root.put_bytes(name, json.dumps(record, sort_keys=True).encode())
