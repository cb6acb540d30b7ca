"""The only module of the operator that talks to S3."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from privatefm_merge import layout
from privatefm_merge.errors import StorageError
from privatefm_merge.verify import VerifyReport, verify_checkpoint

from privatefm_operator.settings import Settings

# What "the store could not be read" looks like; it says nothing about the data itself.
STORE_ERRORS = (StorageError, BotoCoreError, ClientError)
BASE_CACHE_SECONDS = 10.0
_VERSION_DIR = re.compile(r"/v(\d+)/$")
_SEQ_DIR = re.compile(r"/(\d+)/$")


class Storage:
    def __init__(self, settings: Settings) -> None:
        self.bucket = settings.s3_bucket
        self._latest: dict[str, tuple[float, int | None]] = {}
        self.client = boto3.client(
            "s3", endpoint_url=settings.s3_endpoint or None, region_name=settings.s3_region,
            aws_access_key_id=settings.s3_access_key or None, aws_secret_access_key=settings.s3_secret_key or None,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 5, "mode": "standard"}),
        )

    def uri(self, key_prefix: str) -> str:
        return layout.s3_uri(self.bucket, key_prefix)

    def _subdirs(self, prefix: str) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix.rstrip("/") + "/", Delimiter="/")
        return [p["Prefix"] for page in pages for p in page.get("CommonPrefixes", [])]

    def _exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
            return True
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

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
        """A v<k>/ directory counts once its manifest (the commit point) exists."""
        versions = sorted((int(m.group(1)) for d in self._subdirs(f"{layout.BASE_ROOT}/{model}")
                           if (m := _VERSION_DIR.search(d))), reverse=True)
        for version in versions:
            if self._exists(f"{layout.base_prefix(model, version)}/{layout.MANIFEST_NAME}"):
                return version
        return None

    def base_exists(self, model: str, version: int) -> bool:
        prefix = layout.base_prefix(model, version)
        listed = self.client.list_objects_v2(Bucket=self.bucket, Prefix=prefix + "/", MaxKeys=1)
        return bool(listed.get("KeyCount"))

    def latest_adapter_seq(self, ns_uid: str) -> int | None:
        seqs = [int(m.group(1)) for d in self._subdirs(f"{layout.learner_prefix(ns_uid)}/adapters")
                if (m := _SEQ_DIR.search(d))]
        return max(seqs) if seqs else None

    def verify(self, uri: str) -> VerifyReport:
        return verify_checkpoint(uri, s3_client=self.client)

    def append_event(self, ns_uid: str, kind: str, record: dict[str, Any]) -> None:
        """Append-only learner log (the replay source): one object per event, ordered by key."""
        key = f"{layout.events_prefix(ns_uid)}/{time.time_ns():020d}-{kind}.json"
        self.client.put_object(Bucket=self.bucket, Key=key, Body=json.dumps(record, sort_keys=True).encode(),
                               ContentType="application/json")
