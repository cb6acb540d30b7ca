"""The store authorization matrix: every allow and deny of each store identity, on a real MinIO.

A merge run gets temporary credentials from STS AssumeRole, limited by the session policy from
``privatefm_operator.store_policy`` and minted by the operator's own code
(``Storage.mint_run_credentials``). MinIO grants such a session the intersection of that policy
and the operator user's own, as AWS does. Each row below makes one real S3 (or STS, or admin)
call with one identity and asserts it is allowed or denied. A real merge run with nothing but
the session credentials shows the policy is not too tight. The session's expiry is checked last
in the pytest session (the ``privatefm_testing.expiry`` plugin), since STS mints nothing shorter
than 15 minutes.

Needs the pinned ``minio`` build (``scripts/build-tools.sh``), not the Kubernetes cluster.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from botocore.exceptions import ClientError
from privatefm_merge import layout
from privatefm_merge.store import MiB, S3Store
from privatefm_operator.settings import Settings
from privatefm_operator.storage import CredentialsDenied, Storage
from privatefm_operator.store_policy import (
    MAX_SESSION_POLICY_BYTES,
    STS_MAX_DURATION_SECONDS,
    STS_MIN_DURATION_SECONDS,
    Policy,
    merge_session_policy,
    operator_policy,
    publisher_policy,
    session_duration_seconds,
    session_policy_json,
    verify_session_policy,
)
from privatefm_testing.cluster import pid_alive
from privatefm_testing.minio import Credentials, MinioServer
from privatefm_testing.seed import BASE_MODEL, publish_adapter, publish_base

if TYPE_CHECKING:  # the plugin module is imported by pytest_plugins (below), and only there
    from privatefm_testing.expiry import ExpiringMergeSession

# Mints a merge session before the first test and runs test_merge_session_expires last.
pytest_plugins = ["privatefm_testing.expiry"]

BUCKET = "privatefm"
A = "3f1c2a9e-7b44-4d0e-9a51-5c6d7e8f9a0b"   # learner A (namespace UIDs look like this)
B = "8d2e4f60-1a3b-4c5d-8e9f-0a1b2c3d4e5f"   # learner B
A_EXT = A + "0"                                # a uid that extends A's: tests the prefix boundary
BASE_V = 1                                     # the base version A's run merges onto
TARGET = 2                                     # the checkpoint version A's run writes
CLI = str(Path(sys.executable).parent / "privatefm-merge")

BASE = layout.base_prefix(BASE_MODEL, BASE_V)                   # base/tiny-llama/v1
BASE_OTHER = layout.base_prefix(BASE_MODEL, 2)
BASE_SIBLING = layout.base_prefix(BASE_MODEL, 10)               # v10: matched by "v1*", not "v1/*"
A_ADAPTERS = f"{layout.learner_prefix(A)}/adapters"
A_ADAPTER = layout.adapter_prefix(A, 1)
A_TARGET = layout.checkpoint_prefix(A, TARGET)
A_PREVIOUS = layout.checkpoint_prefix(A, 1)                    # A's committed checkpoint
B_ADAPTER = layout.adapter_prefix(B, 1)

Op = Callable[[Credentials], object]


# ---------------------------------------------------------------------------------------------
# The pure builders


def test_session_policies_fit_sts_limit_with_long_names() -> None:
    """The longest bucket name, a long model name and large versions: ~1.1 KB of 2 KB."""
    policy = merge_session_policy("b" * 63, layout.base_prefix("m" * 60, 99999), A_ADAPTERS,
                                  layout.checkpoint_prefix(A, 99999))
    assert len(session_policy_json(policy)) < MAX_SESSION_POLICY_BYTES * 0.6
    assert len(session_policy_json(verify_session_policy(BUCKET, A_TARGET))) < MAX_SESSION_POLICY_BYTES


@pytest.mark.parametrize("prefix", ["base/m/v1*", "learners/${aws:username}", "learners/?", "base/../learners",
                                    "", "/", "base//v1"])
def test_session_policy_refuses_wildcards_and_odd_prefixes(prefix: str) -> None:
    with pytest.raises(ValueError):
        merge_session_policy(BUCKET, BASE, A_ADAPTERS, prefix)


def test_session_policy_lists_directories_only() -> None:
    listing = merge_session_policy(BUCKET, f"/{BASE}/", A_ADAPTERS, A_TARGET)["Statement"][-1]
    assert listing["Condition"] == {"StringLike": {"s3:prefix": [f"{BASE}/*", f"{A_ADAPTERS}/*", f"{A_TARGET}/*"]}}


@pytest.mark.parametrize(("deadline", "expected"), [
    (0, STS_MIN_DURATION_SECONDS),                       # never below what STS accepts
    (3600, 3600 + 900),                                  # the deadline plus the default margin
    (6 * 3600, 6 * 3600 + 900),                          # the operator's default merge deadline
    (48 * 3600, STS_MAX_DURATION_SECONDS),               # never above what STS accepts
])
def test_session_duration(deadline: int, expected: int) -> None:
    assert session_duration_seconds(deadline) == expected


# ---------------------------------------------------------------------------------------------
# The server and its identities


@dataclass
class Identities:
    server: MinioServer
    root: Credentials
    operator: Credentials
    publisher: Credentials
    merge: Credentials     # A's run: base v1, A's adapters, A's checkpoint v2
    verify: Credentials    # read-only on A's checkpoint v1

    def __getitem__(self, name: str) -> Credentials:
        value = getattr(self, name)
        assert isinstance(value, Credentials)
        return value


def operator_storage(operator: Credentials, **settings: Any) -> Storage:
    """The operator's own store client, configured (as its Deployment would be) with its user's keys."""
    return Storage(Settings(s3_endpoint=operator.endpoint, s3_bucket=BUCKET, s3_region=operator.region,
                            s3_access_key=operator.access_key, s3_secret_key=operator.secret_key, **settings))


def mint(operator: Credentials, policy: Policy, session_name: str, duration_seconds: int | None = None) -> Credentials:
    """A run's session, minted the way the operator mints it (``Storage.mint_run_credentials``); by
    default for as long as the merge reconciler asks (its deadline plus the margin)."""
    storage = operator_storage(operator, store_credentials="sts")
    if duration_seconds is None:
        duration_seconds = session_duration_seconds(storage.settings.merge_deadline_seconds)
    issued = storage.mint_run_credentials(policy, duration_seconds, session_name=session_name)
    assert issued.session_token is not None and issued.expires_at is not None, repr(issued)
    return Credentials(operator.endpoint, issued.access_key, issued.secret_key, issued.session_token, operator.region)


def _put_all(client: Any, keys: list[str]) -> None:
    for key in keys:
        client.put_object(Bucket=BUCKET, Key=key, Body=json.dumps({"key": key}).encode())


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Identities]:
    server = MinioServer(tmp_path_factory.mktemp("minio"), bucket=BUCKET)
    root = server.start()
    try:
        publisher = server.add_user("publisher", publisher_policy(BUCKET))
        operator = server.add_user("privatefm-operator", operator_policy(BUCKET))
        # The publisher publishes a real base version (and two more to stay away from); the
        # operator stores the learners' objects.
        publish_base(publisher.client(), BUCKET, version=BASE_V)
        _put_all(publisher.client(), [f"{BASE_OTHER}/config.json", f"{BASE_SIBLING}/config.json"])
        publish_adapter(operator.client(), BUCKET, A, seq=1)
        _put_all(operator.client(), [
            f"{A_PREVIOUS}/manifest.json", f"{A_TARGET}/seeded.json",
            f"{layout.events_prefix(A)}/0001.json",
            f"{B_ADAPTER}/adapter_config.json", f"{layout.checkpoint_prefix(B, 1)}/manifest.json",
            f"{layout.adapter_prefix(A_EXT, 1)}/adapter_config.json", f"audit/{A}.json",
        ])
        # As the merge reconciler (hand_credentials) mints a run's session.
        merge = mint(operator, merge_session_policy(BUCKET, BASE, A_ADAPTERS, A_TARGET), f"{A}-v{TARGET}")
        verify = mint(operator, verify_session_policy(BUCKET, A_PREVIOUS), f"{A}-verify-v1", STS_MIN_DURATION_SECONDS)
        yield Identities(server, root, operator, publisher, merge, verify)
    finally:
        pid = server.pid
        server.stop()
        assert pid is None or not pid_alive(pid), "minio left running"


# ---------------------------------------------------------------------------------------------
# One call each


def get(key: str) -> Op:
    return lambda c: c.client().get_object(Bucket=BUCKET, Key=key)["Body"].read()


def head(key: str) -> Op:
    return lambda c: c.client().head_object(Bucket=BUCKET, Key=key)


def put(key: str) -> Op:
    return lambda c: c.client().put_object(Bucket=BUCKET, Key=key, Body=b"written by the matrix")


def delete(key: str) -> Op:
    return lambda c: c.client().delete_object(Bucket=BUCKET, Key=key)


def delete_batch(key: str) -> Op:
    """DeleteObjects answers 200 and reports each refused key inside the response."""
    def op(c: Credentials) -> None:
        response = c.client().delete_objects(Bucket=BUCKET, Delete={"Objects": [{"Key": key}]})
        errors = response.get("Errors", [])
        if any(e.get("Code") == "AccessDenied" for e in errors):
            raise PermissionError(errors)
        assert not errors, errors
    return op


def list_(prefix: str | None) -> Op:
    kwargs = {} if prefix is None else {"Prefix": prefix}
    return lambda c: c.client().list_objects_v2(Bucket=BUCKET, **kwargs)


def multipart(key: str) -> Op:
    """The merge engine's way of writing a shard: create, upload parts, complete."""
    def op(c: Credentials) -> None:
        s3 = c.client()
        upload = s3.create_multipart_upload(Bucket=BUCKET, Key=key)["UploadId"]
        etag = s3.upload_part(Bucket=BUCKET, Key=key, UploadId=upload, PartNumber=1, Body=b"p" * 1024)["ETag"]
        s3.complete_multipart_upload(Bucket=BUCKET, Key=key, UploadId=upload,
                                     MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": etag}]})
    return op


def multipart_abort(key: str) -> Op:
    """The engine's failure path: list the parts of an unfinished upload and abort it."""
    def op(c: Credentials) -> None:
        s3 = c.client()
        upload = s3.create_multipart_upload(Bucket=BUCKET, Key=key)["UploadId"]
        s3.upload_part(Bucket=BUCKET, Key=key, UploadId=upload, PartNumber=1, Body=b"p")
        s3.list_parts(Bucket=BUCKET, Key=key, UploadId=upload)
        s3.abort_multipart_upload(Bucket=BUCKET, Key=key, UploadId=upload)
    return op


def copy(source: str, key: str) -> Op:
    return lambda c: c.client().copy_object(Bucket=BUCKET, Key=key, CopySource={"Bucket": BUCKET, "Key": source})


def create_bucket(name: str) -> Op:
    return lambda c: c.client().create_bucket(Bucket=name)


def delete_bucket(c: Credentials) -> None:
    c.client().delete_bucket(Bucket=BUCKET)


def make_bucket_public(c: Credentials) -> None:
    public = {"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": {"AWS": ["*"]}, "Action": ["s3:GetObject"],
        "Resource": [f"arn:aws:s3:::{BUCKET}/*"]}]}
    c.client().put_bucket_policy(Bucket=BUCKET, Policy=json.dumps(public))


def list_uploads(c: Credentials) -> None:
    c.client().list_multipart_uploads(Bucket=BUCKET)


def assume_role_again(c: Credentials) -> None:
    c.assume_role()


def create_service_account(c: Credentials) -> None:
    """The admin API's "own account" call (CVE-2025-62506 let restricted sessions use it to
    mint an unrestricted service account of the parent user)."""
    from minio.error import MinioAdminException

    try:
        c.admin().add_service_account()
    except MinioAdminException as err:
        if "AccessDenied" in str(err) or "403" in str(err):
            raise PermissionError(str(err)) from None
        raise


def attempt(op: Op, identity: Credentials) -> str:
    """'allowed' or 'denied'; any other failure (a missing object, a server error) is raised."""
    try:
        op(identity)
    except PermissionError:
        return "denied"
    except ClientError as err:
        code = err.response.get("Error", {}).get("Code")
        if code in ("AccessDenied", "403"):  # a HEAD's denial has no body, only its status
            return "denied"
        raise
    return "allowed"


Row = tuple[str, str, bool, Op]   # identity, what, allowed, the call

MERGE_ROWS: list[Row] = [
    ("merge", "read A's adapter", True, get(f"{A_ADAPTER}/adapter_config.json")),
    ("merge", "stat A's adapter", True, head(f"{A_ADAPTER}/adapter_model.safetensors")),
    ("merge", "list A's adapter (engine's Prefix=<dir>/)", True, list_(f"{A_ADAPTER}/")),
    ("merge", "read the run's base version", True, get(f"{BASE}/config.json")),
    ("merge", "list the run's base version", True, list_(f"{BASE}/")),
    ("merge", "write the target version (single PUT)", True, put(f"{A_TARGET}/probe-put")),
    ("merge", "write the target version (multipart upload)", True, multipart(f"{A_TARGET}/probe-multipart")),
    ("merge", "list parts of and abort an upload in the target version", True, multipart_abort(f"{A_TARGET}/x")),
    ("merge", "read the target version", True, get(f"{A_TARGET}/seeded.json")),
    ("merge", "list the target version", True, list_(f"{A_TARGET}/")),
    ("merge", "delete from the target version", True, delete(f"{A_TARGET}/probe-put")),
    # A's other versions and objects
    ("merge", "write another version of A (v3)", False, put(f"{layout.checkpoint_prefix(A, 3)}/x")),
    ("merge", "multipart upload into another version of A", False, multipart(f"{layout.checkpoint_prefix(A, 3)}/x")),
    ("merge", "write a version whose name extends the target's (v20)", False,
     put(f"{layout.checkpoint_prefix(A, 20)}/x")),
    ("merge", "overwrite A's committed previous version", False, put(f"{A_PREVIOUS}/manifest.json")),
    ("merge", "delete from A's previous version", False, delete(f"{A_PREVIOUS}/manifest.json")),
    ("merge", "read A's previous version", False, get(f"{A_PREVIOUS}/manifest.json")),
    ("merge", "write A's adapters", False, put(f"{A_ADAPTER}/adapter_model.safetensors")),
    ("merge", "delete A's adapter", False, delete(f"{A_ADAPTER}/adapter_config.json")),
    ("merge", "read A's event log", False, get(f"{layout.events_prefix(A)}/0001.json")),
    ("merge", "append to A's event log", False, put(f"{layout.events_prefix(A)}/0002.json")),
    ("merge", "list A's checkpoints", False, list_(f"{layout.learner_prefix(A)}/checkpoints/")),
    ("merge", "list A's whole prefix", False, list_(f"{layout.learner_prefix(A)}/")),
    ("merge", "list the target version without its trailing slash (would list v20)", False, list_(A_TARGET)),
    # learner B, and a learner whose uid starts with A's
    ("merge", "read B's adapter", False, get(f"{B_ADAPTER}/adapter_config.json")),
    ("merge", "stat B's adapter", False, head(f"{B_ADAPTER}/adapter_config.json")),
    ("merge", "read B's checkpoint", False, get(f"{layout.checkpoint_prefix(B, 1)}/manifest.json")),
    ("merge", "list B's prefix", False, list_(f"{layout.learner_prefix(B)}/")),
    ("merge", "list B's adapters", False, list_(f"{layout.learner_prefix(B)}/adapters/")),
    ("merge", "write B's adapters", False, put(f"{B_ADAPTER}/adapter_model.safetensors")),
    ("merge", "write B's next checkpoint", False, put(f"{layout.checkpoint_prefix(B, TARGET)}/x")),
    ("merge", "delete B's checkpoint", False, delete(f"{layout.checkpoint_prefix(B, 1)}/manifest.json")),
    ("merge", "copy B's adapter into the target version", False,
     copy(f"{B_ADAPTER}/adapter_config.json", f"{A_TARGET}/stolen.json")),
    ("merge", "read the adapter of a learner whose uid extends A's", False,
     get(f"{layout.adapter_prefix(A_EXT, 1)}/adapter_config.json")),
    ("merge", "list the adapters of a learner whose uid extends A's", False, list_(f"learners/{A_EXT}/adapters/")),
    # base/
    ("merge", "overwrite a file of the run's own base version", False, put(f"{BASE}/config.json")),
    ("merge", "delete a file of the run's own base version", False, delete(f"{BASE}/config.json")),
    ("merge", "batch-delete a file of the run's own base version", False, delete_batch(f"{BASE}/config.json")),
    ("merge", "multipart upload into the run's base version", False, multipart(f"{BASE}/model-evil.safetensors")),
    ("merge", "publish a new base version", False, put(f"{layout.base_prefix(BASE_MODEL, 3)}/config.json")),
    ("merge", "read another base version", False, get(f"{BASE_OTHER}/config.json")),
    ("merge", "read a base version whose name extends the run's (v10)", False, get(f"{BASE_SIBLING}/config.json")),
    ("merge", "list the base version without its trailing slash (would list v10)", False, list_(BASE)),
    ("merge", "list all base versions", False, list_(f"base/{BASE_MODEL}/")),
    # the bucket, STS and the admin API
    ("merge", "list the whole bucket", False, list_(None)),
    ("merge", "list learners/", False, list_("learners/")),
    ("merge", "list the bucket's multipart uploads", False, list_uploads),
    ("merge", "create a bucket", False, create_bucket("privatefm-other")),
    ("merge", "delete the bucket", False, delete_bucket),
    ("merge", "make the bucket public", False, make_bucket_public),
    ("merge", "assume a role again (escape the session policy)", False, assume_role_again),
    ("merge", "create a service account (admin API)", False, create_service_account),
]

VERIFY_ROWS: list[Row] = [
    ("verify", "read the checkpoint", True, get(f"{A_PREVIOUS}/manifest.json")),
    ("verify", "stat the checkpoint", True, head(f"{A_PREVIOUS}/manifest.json")),
    ("verify", "list the checkpoint", True, list_(f"{A_PREVIOUS}/")),
    ("verify", "overwrite the checkpoint", False, put(f"{A_PREVIOUS}/manifest.json")),
    ("verify", "delete from the checkpoint", False, delete(f"{A_PREVIOUS}/manifest.json")),
    ("verify", "multipart upload into the checkpoint", False, multipart(f"{A_PREVIOUS}/x")),
    ("verify", "read another version of A", False, get(f"{A_TARGET}/seeded.json")),
    ("verify", "read A's adapter", False, get(f"{A_ADAPTER}/adapter_config.json")),
    ("verify", "read a base version", False, get(f"{BASE}/config.json")),
    ("verify", "read B's checkpoint", False, get(f"{layout.checkpoint_prefix(B, 1)}/manifest.json")),
    ("verify", "list A's checkpoints", False, list_(f"{layout.learner_prefix(A)}/checkpoints/")),
    ("verify", "list the whole bucket", False, list_(None)),
    ("verify", "create a bucket", False, create_bucket("privatefm-other")),
    # read-only: nothing anywhere may change, its own checkpoint included
    ("verify", "batch-delete from the checkpoint", False, delete_batch(f"{A_PREVIOUS}/manifest.json")),
    ("verify", "copy into the checkpoint", False, copy(f"{A_PREVIOUS}/manifest.json", f"{A_PREVIOUS}/copy.json")),
    ("verify", "write another version of A", False, put(f"{A_TARGET}/x")),
    ("verify", "delete from another version of A", False, delete(f"{A_TARGET}/seeded.json")),
    ("verify", "write A's adapters", False, put(f"{A_ADAPTER}/adapter_model.safetensors")),
    ("verify", "append to A's event log", False, put(f"{layout.events_prefix(A)}/0002.json")),
    ("verify", "write B's checkpoint", False, put(f"{layout.checkpoint_prefix(B, 1)}/manifest.json")),
    ("verify", "delete B's checkpoint", False, delete(f"{layout.checkpoint_prefix(B, 1)}/manifest.json")),
    ("verify", "overwrite a file of a base version", False, put(f"{BASE}/config.json")),
    ("verify", "delete a file of a base version", False, delete(f"{BASE}/config.json")),
    ("verify", "write the audit log", False, put(f"audit/{A}.json")),
    # and nothing else may be read or listed
    ("verify", "read A's event log", False, get(f"{layout.events_prefix(A)}/0001.json")),
    ("verify", "list the checkpoint without its trailing slash (would list v10)", False, list_(A_PREVIOUS)),
    ("verify", "list A's whole prefix", False, list_(f"{layout.learner_prefix(A)}/")),
    ("verify", "list B's prefix", False, list_(f"{layout.learner_prefix(B)}/")),
    ("verify", "list B's checkpoint", False, list_(f"{layout.checkpoint_prefix(B, 1)}/")),
    ("verify", "read the adapter of a learner whose uid extends A's", False,
     get(f"{layout.adapter_prefix(A_EXT, 1)}/adapter_config.json")),
    ("verify", "list the bucket's multipart uploads", False, list_uploads),
    ("verify", "delete the bucket", False, delete_bucket),
    ("verify", "assume a role again (escape the session policy)", False, assume_role_again),
    ("verify", "create a service account (admin API)", False, create_service_account),
]

IDENTITY_ROWS: list[Row] = [
    ("operator", "read a base version", True, get(f"{BASE}/config.json")),
    ("operator", "list base/", True, list_("base/")),
    ("operator", "overwrite a file of a base version", False, put(f"{BASE}/config.json")),
    ("operator", "publish a new base version", False, put(f"{layout.base_prefix(BASE_MODEL, 3)}/config.json")),
    ("operator", "multipart upload into base/", False, multipart(f"{layout.base_prefix(BASE_MODEL, 3)}/x")),
    ("operator", "delete a file of a base version", False, delete(f"{BASE}/config.json")),
    ("operator", "batch-delete a file of a base version", False, delete_batch(f"{BASE}/config.json")),
    ("operator", "write a learner's checkpoint", True, put(f"{layout.checkpoint_prefix(B, 9)}/x")),
    ("operator", "multipart upload into a learner's prefix", True, multipart(f"{layout.checkpoint_prefix(B, 9)}/y")),
    ("operator", "delete a learner's objects", True, delete(f"{layout.checkpoint_prefix(B, 9)}/x")),
    ("operator", "write the audit log", True, put(f"audit/{B}.json")),
    ("operator", "list the whole bucket", True, list_(None)),
    ("operator", "list the bucket's multipart uploads", True, list_uploads),
    ("operator", "write outside base/, learners/ and audit/", False, put("elsewhere/x")),
    ("operator", "create a bucket", False, create_bucket("privatefm-other")),
    ("operator", "delete the bucket", False, delete_bucket),
    ("operator", "make the bucket public", False, make_bucket_public),
    ("publisher", "publish a new base version", True, put(f"{layout.base_prefix(BASE_MODEL, 7)}/config.json")),
    ("publisher", "multipart upload into base/", True, multipart(f"{layout.base_prefix(BASE_MODEL, 7)}/shard")),
    ("publisher", "read base/ (to seal a manifest)", True, get(f"{BASE}/config.json")),
    ("publisher", "list base/", True, list_("base/")),
    ("publisher", "delete from base/", True, delete(f"{layout.base_prefix(BASE_MODEL, 7)}/config.json")),
    ("publisher", "read a learner's adapter", False, get(f"{A_ADAPTER}/adapter_config.json")),
    ("publisher", "write a learner's checkpoint", False, put(f"{layout.checkpoint_prefix(A, 9)}/x")),
    ("publisher", "write the audit log", False, put(f"audit/{A}.json")),
    ("publisher", "list learners/", False, list_("learners/")),
    ("publisher", "list the whole bucket", False, list_(None)),
]


def _params(rows: list[Row]) -> list[Any]:
    return [pytest.param(identity, allowed, op, id=f"{identity}: {what}")
            for identity, what, allowed, op in rows]


@pytest.mark.parametrize(("identity", "allowed", "op"), _params(MERGE_ROWS + VERIFY_ROWS + IDENTITY_ROWS))
def test_store_authorization(store: Identities, identity: str, allowed: bool, op: Op) -> None:
    assert attempt(op, store[identity]) == ("allowed" if allowed else "denied")


# ---------------------------------------------------------------------------------------------
# STS itself


@pytest.mark.parametrize(("seconds", "accepted"), [
    (STS_MIN_DURATION_SECONDS - 1, False),
    (STS_MIN_DURATION_SECONDS, True),
    (STS_MAX_DURATION_SECONDS, True),
    (365 * 24 * 3600, True),          # MinIO's own ceiling (AWS stops at 12 h)
    (365 * 24 * 3600 + 1, False),
])
def test_sts_duration_bounds(store: Identities, seconds: int, accepted: bool) -> None:
    """What the server accepts for DurationSeconds; store_policy clamps inside it."""
    policy = session_policy_json(verify_session_policy(BUCKET, A_PREVIOUS))
    if accepted:
        store.operator.assume_role(policy, duration_seconds=seconds)
    else:
        with pytest.raises(ClientError, match="InvalidParameterValue"):
            store.operator.assume_role(policy, duration_seconds=seconds, validate=False)


def test_shared_insecure_mode_hands_out_the_operators_own_keys(store: Identities) -> None:
    """The documented insecure mode (stores without STS): no session, no scope, the operator's rights."""
    issued = operator_storage(store.operator, store_credentials="shared-insecure").mint_run_credentials(
        merge_session_policy(BUCKET, BASE, A_ADAPTERS, A_TARGET), STS_MIN_DURATION_SECONDS, session_name=f"{A}-v9")
    assert (issued.access_key, issued.secret_key) == (store.operator.access_key, store.operator.secret_key)
    assert issued.session_token is None and issued.expires_at is None
    shared = Credentials(store.operator.endpoint, issued.access_key, issued.secret_key, issued.session_token)
    assert attempt(get(f"{B_ADAPTER}/adapter_config.json"), shared) == "allowed"  # what "insecure" means


@pytest.mark.parametrize("wrong", ["secret key", "access key"])
def test_refused_assume_role_is_credentials_denied(store: Identities, wrong: str) -> None:
    """STS refusing the operator (MinIO: 403 AccessDenied) is CredentialsDenied, which fails the run
    (a configuration problem), not a StorageError, which the reconciler would retry."""
    keys = {"s3_access_key": store.operator.access_key, "s3_secret_key": store.operator.secret_key}
    field = "s3_secret_key" if wrong == "secret key" else "s3_access_key"
    keys[field] = "wrong-" + keys[field]
    storage = Storage(Settings(s3_endpoint=store.server.endpoint, s3_bucket=BUCKET, store_credentials="sts", **keys))
    with pytest.raises(CredentialsDenied, match="refused") as refused:
        storage.mint_run_credentials(merge_session_policy(BUCKET, BASE, A_ADAPTERS, A_TARGET),
                                     STS_MIN_DURATION_SECONDS, session_name=f"{A}-v{TARGET}")
    cause = refused.value.__cause__
    assert isinstance(cause, ClientError)
    assert cause.response["Error"]["Code"] == "AccessDenied"
    assert cause.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_session_policy_cannot_widen_the_operators_own(store: Identities) -> None:
    """A session policy that allows everything still cannot write base/: the intersection rule."""
    everything = json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["s3:*"], "Resource": ["arn:aws:s3:::*"]}]})
    session = store.operator.assume_role(everything)
    assert attempt(put(f"{BASE}/config.json"), session) == "denied"
    assert attempt(get(f"{BASE}/config.json"), session) == "allowed"


# ---------------------------------------------------------------------------------------------
# The merge engine with nothing but a run's credentials


def _only(credentials: Credentials, home: Path) -> dict[str, str]:
    """A process environment with the run's credentials and nothing else to authenticate with."""
    return {"PATH": os.environ["PATH"], "HOME": str(home), **credentials.env()}


def test_merge_runs_with_only_its_session_credentials(store: Identities, tmp_path: Path) -> None:
    target = layout.checkpoint_prefix(A, 5)
    session = mint(store.operator, merge_session_policy(BUCKET, BASE, A_ADAPTERS, target), f"{A}-v5",
                   session_duration_seconds(600))
    merged = subprocess.run(
        [CLI, "merge", "--base", layout.s3_uri(BUCKET, BASE), "--adapter", layout.s3_uri(BUCKET, A_ADAPTER),
         "--output", layout.s3_uri(BUCKET, target), "--version", "5", "--parent-version", "1",
         "--base-model", BASE_MODEL, "--base-version", str(BASE_V), "--device", "cpu"],
        env=_only(session, tmp_path), capture_output=True, text=True, timeout=300)
    assert merged.returncode == 0, merged.stdout + merged.stderr
    assert json.loads(merged.stdout)["status"] == "Succeeded"

    # A retried Job finds its own commit and succeeds again (it reads the target version).
    again = subprocess.run(
        [CLI, "merge", "--base", layout.s3_uri(BUCKET, BASE), "--adapter", layout.s3_uri(BUCKET, A_ADAPTER),
         "--output", layout.s3_uri(BUCKET, target), "--version", "5", "--device", "cpu"],
        env=_only(session, tmp_path), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr

    reader = mint(store.operator, verify_session_policy(BUCKET, target), f"{A}-verify-v5", STS_MIN_DURATION_SECONDS)
    verified = subprocess.run([CLI, "verify", layout.s3_uri(BUCKET, target)], env=_only(reader, tmp_path),
                              capture_output=True, text=True, timeout=120)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.startswith("OK ")


def test_merge_into_another_version_is_refused_by_the_store(store: Identities, tmp_path: Path) -> None:
    """The same session pointed at a version it was not minted for: the store says no."""
    session = store.operator.assume_role(session_policy_json(
        merge_session_policy(BUCKET, BASE, A_ADAPTERS, layout.checkpoint_prefix(A, 6))))
    merged = subprocess.run(
        [CLI, "merge", "--base", layout.s3_uri(BUCKET, BASE), "--adapter", layout.s3_uri(BUCKET, A_ADAPTER),
         "--output", layout.s3_uri(BUCKET, layout.checkpoint_prefix(A, 7)), "--device", "cpu"],
        env=_only(session, tmp_path), capture_output=True, text=True, timeout=300)
    assert merged.returncode == 1, merged.stdout + merged.stderr
    result = json.loads(merged.stdout)
    assert result["status"] == "Failed" and "AccessDenied" in result["message"], result
    listed = store.root.client().list_objects_v2(Bucket=BUCKET, Prefix=f"{layout.checkpoint_prefix(A, 7)}/")
    assert listed.get("KeyCount", 0) == 0


def test_engine_multipart_writer_with_session_credentials(store: Identities) -> None:
    """The engine's own streaming writer, with parts of S3's minimum size, inside and outside the grant."""
    session = store.merge.client()
    inside = S3Store(session, BUCKET, A_TARGET, part_size=5 * MiB)
    with inside.open_write("big.bin") as writer:
        writer.write(b"\1" * (6 * MiB))  # two parts
    assert inside.stat("big.bin") == 6 * MiB

    from privatefm_merge.errors import StorageError

    outside = S3Store(session, BUCKET, layout.checkpoint_prefix(A, 3), part_size=5 * MiB)
    with pytest.raises(StorageError, match="AccessDenied"), outside.open_write("big.bin") as writer:
        writer.write(b"\1" * (6 * MiB))


# ---------------------------------------------------------------------------------------------
# Expiry: checked last in the pytest session


EXPIRY_MARGIN_SECONDS = 3          # past the Expiration STS answered, on the same clock as the server
# What MinIO answers (403) once a session has expired: it forgets the temporary access key (it never
# says ExpiredToken), from the second STS named as its Expiration on; HEAD gets a bare 403.
DENIED_AFTER_EXPIRY = "InvalidAccessKeyId"


@pytest.mark.slow
def test_merge_session_expires(expiring_merge_session: ExpiringMergeSession) -> None:
    """A run's credentials stop working when STS said they would, and live as long as asked.

    STS mints nothing shorter than 900 s, and MinIO has no setting to shorten it, so this test
    cannot help outliving a 15-minute session. The ``privatefm_testing.expiry`` plugin mints it
    (with ``Storage.mint_run_credentials``, on its own MinIO) right after collection and reads an
    allowed object with it at once; requesting its fixture runs this test last in the session,
    so it waits only for what is left of the 900 s once everything else has run (alone: all of it).
    """
    session = expiring_merge_session
    assert session.first_read == "allowed", "the session could not read its own base version right after minting"
    lifetime = (session.expires_at - session.minted_at).total_seconds()
    assert abs(lifetime - session.asked_seconds) <= 5, (lifetime, session.asked_seconds)
    if session.seconds_left() > 2 * EXPIRY_MARGIN_SECONDS:  # still good: the denial below is the clock's doing
        assert session.read() == "allowed"
    waited = session.wait_past_expiry(EXPIRY_MARGIN_SECONDS)
    print(f"waited {waited:.1f} s for the {session.asked_seconds} s session to expire")
    session.code_after_expiry = session.read()
    assert session.code_after_expiry == DENIED_AFTER_EXPIRY
