"""The only module of the operator that talks to S3 (through the merge package's store) and STS.

One S3 stack: every read and write goes through ``privatefm_merge.store.S3Store``, so a store
problem is always a ``StorageError`` (it says nothing about the data itself). STS mints each
run's own temporary credentials (``mint_run_credentials``).
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from privatefm_merge import contract, layout
from privatefm_merge.adapter_log import SIDECAR_NAME, AdapterMode, parse_sidecar
from privatefm_merge.errors import StorageError
from privatefm_merge.manifest import Manifest, check_store_checksum, parse_manifest, sha256_hex
from privatefm_merge.seal import clone_checkpoint
from privatefm_merge.store import S3Store, make_s3_client
from privatefm_merge.verify import VerifyReport, read_manifest, verify_checkpoint

from privatefm_operator import decisions, metrics, store_policy
from privatefm_operator.settings import Settings

log = logging.getLogger("privatefm.operator")

BASE_CACHE_SECONDS = 10.0
_VERSION_DIR = re.compile(r"^v(\d+)$")
_SEQ_DIR = re.compile(r"^(\d+)$")


class CredentialsDenied(Exception):
    """STS refused to mint a run's credentials: a configuration problem, not a passing outage."""


@dataclass(frozen=True)
class RunCredentials:
    """What one run's pod gets to reach the store. Never logged, never in a status or an Event."""

    access_key: str
    secret_key: str
    session_token: str | None  # None only in the shared-insecure mode
    expires_at: datetime | None

    def __repr__(self) -> str:  # a stray log line must not carry the keys
        return f"RunCredentials(expires_at={self.expires_at}, scoped={self.session_token is not None})"

    def env(self, endpoint: str, region: str) -> dict[str, str]:
        """The standard variables boto3 reads in the merge pod."""
        env = {contract.ENV_S3_REGION: region, contract.ENV_S3_ACCESS_KEY: self.access_key,
               contract.ENV_S3_SECRET_KEY: self.secret_key}
        if endpoint:  # empty: AWS's own endpoint for the region
            env[contract.ENV_S3_ENDPOINT] = endpoint
        if self.session_token:
            env[contract.ENV_S3_SESSION_TOKEN] = self.session_token
        return env


class Storage:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.bucket = settings.s3_bucket
        # Short timeouts and few retries: an unreachable store must show in status within a resync.
        self.client = make_s3_client(settings.s3_endpoint, settings.s3_region, settings.s3_access_key,
                                     settings.s3_secret_key, max_attempts=3, timeout=settings.store_timeout_seconds)
        self.root = S3Store(self.client, self.bucket, "")
        self._latest: dict[str, tuple[float, int | None]] = {}
        self._sts: Any = None
        if settings.store_credentials == "shared-insecure":
            log.warning("INSECURE: store_credentials=shared-insecure hands every merge pod the operator's own "
                        "store keys; learners are not isolated from each other in the store")

    @property
    def scoped(self) -> bool:
        """Whether runs get credentials scoped to themselves (False: the insecure shared mode)."""
        return self.settings.store_credentials == "sts"

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

    def adapter_log(self, ns_uid: str) -> list[tuple[int, AdapterMode]]:
        """Every adapter of the learner with its mode (its ``privatefm.json`` sidecar; none: cumulative).
        Raises ``ValueError`` naming the adapter whose sidecar is malformed."""
        prefix = f"{layout.learner_prefix(ns_uid)}/adapters"
        log_ = []
        for seq in sorted(int(m.group(1)) for d in self.root.list_dirs(prefix) if (m := _SEQ_DIR.match(d))):
            key = f"{layout.adapter_prefix(ns_uid, seq)}/{SIDECAR_NAME}"
            try:
                data = self.root.read_bytes(key) if self.root.exists(key) else None
                log_.append((seq, parse_sidecar(data)))
            except ValueError as err:
                raise ValueError(f"adapter {seq}: {err}") from None
        return log_

    def check_checkpoint(self, ns_uid: str, version: int, expected_manifest_sha256: str) -> list[decisions.Finding]:
        """The cheap check: the manifest, and every listed file's presence and size (one LIST), and
        no model bytes. Where the store kept a checksum at upload it is compared too."""
        prefix = layout.checkpoint_prefix(ns_uid, version)
        store = self._at(prefix)
        stored = {info.name: info.size for info in store.list_files()}
        if layout.MANIFEST_NAME not in stored:
            return decisions.cheap_findings(expected_manifest_sha256, None, None, stored)
        data = store.read_bytes(layout.MANIFEST_NAME)
        if sha256_hex(data) != expected_manifest_sha256:  # it names what it was, not what it should be
            return decisions.cheap_findings(expected_manifest_sha256, sha256_hex(data), {}, stored)
        manifest = parse_manifest(data)  # the bytes that were verified: it parses
        listed = {entry.name: entry.size for entry in manifest.files}
        return decisions.cheap_findings(expected_manifest_sha256, sha256_hex(data), listed, stored,
                                        self._checksums(store, manifest))

    def _checksums(self, store: S3Store, manifest: Manifest) -> dict[str, str]:
        """Files whose checksum the store kept at upload no longer matches the manifest (one HEAD
        per file; no object bytes). A file whose store kept no checksum cannot be checked here."""
        problems = {}
        for entry in manifest.files:
            stat = store.head(entry.name)
            problem = check_store_checksum(entry, stat) if stat is not None else None
            if problem is not None:
                problems[entry.name] = problem.detail
        return problems

    def clone_base(self, model: str, base_version: int, ns_uid: str, version: int,
                   parent_version: int | None) -> tuple[int, str]:
        """A learner with no adapter falls back to a plain copy of the base: server-side copies into
        checkpoint ``version`` and a manifest of its own; no model bytes pass through the operator.
        Returns (total bytes, manifest sha256)."""
        manifest, sha = clone_checkpoint(self.uri(layout.base_prefix(model, base_version)),
                                         self.uri(layout.checkpoint_prefix(ns_uid, version)), version=version,
                                         parent_version=parent_version, base_model=model,
                                         base_version=base_version, s3_client=self.client)
        return sum(entry.size for entry in manifest.files), sha

    def learner_history(self, ns_uid: str) -> tuple[int | None, list[dict[str, Any]]]:
        """What the store remembers of a learner whose CR has no status (re-created after a CRD
        reinstall or a GitOps re-sync): the highest checkpoint version ever written to, and the
        operator's own records of verified merges (merge pods cannot write the event log)."""
        prefix = layout.learner_prefix(ns_uid)
        versions = [int(m.group(1)) for d in self.root.list_dirs(f"{prefix}/checkpoints")
                    if (m := _VERSION_DIR.match(d))]
        records = []
        for info in self.root.list_files(layout.events_prefix(ns_uid)):
            if info.name.endswith("-merge.json"):
                try:
                    records.append(json.loads(self.root.read_bytes(info.name)))
                except ValueError:
                    log.warning("unreadable event record %s", info.name)
        return (max(versions) if versions else None), records

    def delete_learner(self, ns_uid: str, model: str) -> tuple[int, int]:
        """Deletes everything under ``learners/<nsUid>/`` and aborts its unfinished uploads;
        returns (objects, bytes) removed. Never anything outside that prefix."""
        learner = self._at(layout.learner_prefix(ns_uid))
        files = learner.list_files()
        # Unfinished uploads are listed by exact key on some stores (MinIO): a checkpoint's shards
        # have its base's file names, so those names are tried in every version directory.
        shard_names = {name for v in self._base_versions(model) for name in self.base_files(model, v)}
        candidates = [f"checkpoints/{d}/{n}" for d in learner.list_dirs("checkpoints") for n in shard_names]
        learner.delete_prefix()
        learner.abort_uploads("", candidates)
        return len(files), sum(f.size for f in files)

    def _base_versions(self, model: str) -> list[int]:
        return [int(m.group(1)) for d in self.root.list_dirs(f"{layout.BASE_ROOT}/{model}")
                if (m := _VERSION_DIR.match(d)) and self.base_exists(model, int(m.group(1)))]

    def write_audit(self, ns_uid: str, name: str, record: dict[str, Any]) -> str:
        """An audit record under ``audit/<nsUid>/``, outside the learner's prefix so it outlives it."""
        key = f"audit/{ns_uid}/{name}.json"
        self.root.put_bytes(key, json.dumps(record, sort_keys=True, indent=2).encode())
        return self.uri(key)

    def verify(self, key_prefix: str) -> VerifyReport:
        """Check the checkpoint at ``key_prefix`` against its manifest without reading its bytes
        where the store kept a SHA-256 checksum at upload (one HEAD per file: the store checked the
        uploaded bytes against it); a file without one is read and hashed. The independent
        byte-level rehash is the deep check's verify Job (``reconcilers.verify``)."""
        report = verify_checkpoint(self.uri(key_prefix), store=self._at(key_prefix), trust_store_checksums=True)
        metrics.ACCEPT_BYTES_READ.inc(report.bytes_read)
        return report

    def append_event(self, ns_uid: str, kind: str, record: dict[str, Any]) -> None:
        """Append-only learner log (the replay source): one object per event, ordered by key."""
        name = f"{layout.events_prefix(ns_uid)}/{time.time_ns():020d}-{kind}.json"
        self.root.put_bytes(name, json.dumps(record, sort_keys=True).encode())

    def base_files(self, model: str, version: int) -> list[str]:
        """The file names of a published base version (a checkpoint of it has the same shards)."""
        manifest, _ = read_manifest(self.uri(layout.base_prefix(model, version)), store=self._at(
            layout.base_prefix(model, version)))
        return [entry.name for entry in manifest.files]

    def abort_uploads(self, key_prefix: str, names: list[str]) -> int:
        """Aborts unfinished multipart uploads a failed run left under ``key_prefix``."""
        return self._at(key_prefix).abort_uploads("", names)

    # ---- STS -----------------------------------------------------------------------------------
    def mint_run_credentials(self, policy: store_policy.Policy, duration_seconds: int,
                             session_name: str) -> RunCredentials:
        """Temporary credentials limited by ``policy`` (a session policy: the store grants the
        intersection of it and the operator's own rights), living ``duration_seconds``."""
        settings = self.settings
        if not self.scoped:
            return RunCredentials(settings.s3_access_key, settings.s3_secret_key, None, None)
        from botocore.exceptions import BotoCoreError, ClientError, ParamValidationError

        kwargs: dict[str, Any] = {
            "RoleArn": settings.store_role_arn, "RoleSessionName": session_name[:64],
            "DurationSeconds": duration_seconds, "Policy": store_policy.session_policy_json(policy)}
        if settings.store_role_external_id:
            kwargs["ExternalId"] = settings.store_role_external_id
        try:
            issued = self._sts_client().assume_role(**kwargs)["Credentials"]
        except ClientError as err:
            raise CredentialsDenied(f"STS AssumeRole of {settings.store_role_arn} refused: "
                                    f"{err.response.get('Error', {}).get('Message', err)}") from err
        except ParamValidationError as err:  # a request that can never succeed: not an outage
            raise CredentialsDenied(f"STS AssumeRole request is invalid: {err}") from err
        except BotoCoreError as err:
            raise StorageError(f"STS unreachable: {err}") from err
        return RunCredentials(issued["AccessKeyId"], issued["SecretAccessKey"], issued["SessionToken"],
                              issued.get("Expiration"))

    def _sts_client(self) -> Any:
        if self._sts is None:
            import boto3
            from botocore.config import Config

            settings = self.settings
            self._sts = boto3.client(
                "sts", endpoint_url=settings.sts_endpoint or settings.s3_endpoint or None,
                region_name=settings.s3_region, aws_access_key_id=settings.s3_access_key or None,
                aws_secret_access_key=settings.s3_secret_key or None,
                config=Config(connect_timeout=settings.store_timeout_seconds,
                              read_timeout=settings.store_timeout_seconds, retries={"max_attempts": 3}))
        return self._sts

    # ---- retention -----------------------------------------------------------------------------
    def checkpoint_dirs(self, ns_uid: str) -> list[CheckpointDir]:
        """A learner's checkpoint version directories: objects, bytes, and whether the manifest (the
        commit point) is there. One listing, no object read."""
        found: dict[int, CheckpointDir] = {}
        for info in self._at(f"{layout.learner_prefix(ns_uid)}/checkpoints").list_files():
            directory, _, name = info.name.partition("/")
            if not (m := _VERSION_DIR.match(directory)):
                continue
            version = int(m.group(1))
            seen = found.get(version, CheckpointDir(version, 0, 0, False))
            found[version] = CheckpointDir(version, seen.objects + 1, seen.size_bytes + info.size,
                                           seen.committed or name == layout.MANIFEST_NAME)
        return [found[v] for v in sorted(found)]

    def delete_checkpoint(self, ns_uid: str, version: int, upload_names: list[str]) -> tuple[int, int]:
        """Deletes ``checkpoints/v<version>/`` of one learner, manifest last (a half-deleted version
        is never taken for committed), and aborts its unfinished uploads of ``upload_names``;
        returns (objects, bytes) removed."""
        store = self._at(layout.checkpoint_prefix(ns_uid, version))
        files = store.list_files()
        for info in sorted(files, key=lambda f: f.name == layout.MANIFEST_NAME):
            store.delete(info.name)
        store.abort_uploads("", upload_names)
        return len(files), sum(f.size for f in files)

    def checkpoint_upload_names(self, model: str) -> list[str]:
        """The names a checkpoint's unfinished uploads can have (its base's file names): MinIO lists
        unfinished uploads by exact key only."""
        return sorted({name for v in self._base_versions(model) for name in self.base_files(model, v)})

    def abort_stale_uploads(self, ns_uid: str, versions: list[int], upload_names: list[str], older_than: float,
                            now: datetime, spare: set[int] | frozenset[int] = frozenset()) -> int:
        """Aborts unfinished multipart uploads under ``learners/<nsUid>/`` started more than
        ``older_than`` seconds before ``now`` (a killed merge leaves them behind). Found by prefix
        (AWS) and by exact key (MinIO): ``upload_names`` in each of ``versions``' directories, and
        the adapter files of every adapter directory. Uploads into a ``spare`` version (a run is
        writing it) are left alone. Returns how many were aborted."""
        prefix = layout.learner_prefix(ns_uid)
        learner = self._at(prefix)
        names = [f"checkpoints/v{v}/{n}" for v in versions for n in upload_names]
        names += [f"adapters/{d}/{n}" for d in learner.list_dirs("adapters") if _SEQ_DIR.match(d)
                  for n in ADAPTER_FILES]
        aborted = 0
        try:
            for upload in learner.incomplete_uploads("", names):
                relative = str(upload["Key"])[len(prefix) + 1:]
                directory = relative.split("/")[1] if relative.startswith("checkpoints/") else ""
                if (m := _VERSION_DIR.match(directory)) and int(m.group(1)) in spare:
                    continue
                initiated = upload.get("Initiated")
                if isinstance(initiated, datetime) and (now - initiated).total_seconds() < older_than:
                    continue
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                aborted += 1
        except _boto_errors() as err:
            raise StorageError(f"aborting stale uploads under {self.uri(prefix)}: {err}") from err
        return aborted


ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json", "privatefm.json")


@dataclass(frozen=True)
class CheckpointDir:
    """One ``checkpoints/v<N>/`` directory as the store lists it."""

    version: int
    objects: int
    size_bytes: int
    committed: bool  # its manifest exists


def _boto_errors() -> tuple[type[Exception], ...]:
    from botocore.exceptions import BotoCoreError, ClientError

    return (BotoCoreError, ClientError)
