"""Which S3 permissions each identity gets: pure builders of IAM policy documents, no I/O.

A merge pod runs untrusted inputs (a learner's adapter) through a lot of native code, so it
must not hold the operator's own store credentials. The operator instead asks STS for
temporary credentials (``AssumeRole``) with an inline *session policy* from
:func:`merge_session_policy`. The store grants such a session the intersection of that policy
and the operator's own policy, so a pod can read exactly one base version and its learner's
adapters and write exactly one checkpoint version, and nothing else, whatever code runs in it.

The identity policies (:func:`operator_policy`, :func:`publisher_policy`) describe what the two
long-lived identities are given by whoever runs the store; the tests attach them to real users.

Prefixes are the layout's (``privatefm_merge.layout``): without leading or trailing slashes.
"""

from __future__ import annotations

import json
import re
from typing import Any

Policy = dict[str, Any]

VERSION = "2012-10-17"

# AssumeRole's bounds on DurationSeconds. 900 s is the floor on AWS and MinIO alike (MinIO
# rejects less, and its MINIO_STS_DURATION override is held to the same floor). The ceiling
# on AWS is the role's MaxSessionDuration, at most 12 h; MinIO allows up to 365 days. 12 h is
# the bound both accept.
STS_MIN_DURATION_SECONDS = 900
STS_MAX_DURATION_SECONDS = 12 * 3600
# Time between minting the credentials and the Job's activeDeadlineSeconds clock starting
# (pod scheduling, image pull, a queue), plus clock skew.
DEFAULT_SESSION_MARGIN_SECONDS = 15 * 60

# AWS and MinIO both refuse an inline session policy longer than this (MinIO counts the bytes
# of its own compact re-serialisation; AWS a packed size). Ours stay far below it.
MAX_SESSION_POLICY_BYTES = 2048

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
# Layout segments only: no IAM wildcards ('*', '?') and no policy variables ('${...}').
_PREFIX = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*$")

# What writing one object with the merge engine's S3 writer takes: a PUT for small files, a
# multipart upload (create, parts, complete, abort on failure) for shards. PutObject covers
# CreateMultipartUpload, UploadPart and CompleteMultipartUpload.
_WRITE_OBJECT = ["s3:PutObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"]


def _bucket(bucket: str) -> str:
    if not _BUCKET.match(bucket):
        raise ValueError(f"invalid bucket name {bucket!r}")
    return bucket


def _prefix(prefix: str, what: str) -> str:
    prefix = prefix.strip("/")
    if not _PREFIX.match(prefix) or any(part in (".", "..") for part in prefix.split("/")):
        raise ValueError(f"invalid {what} {prefix!r}: path segments of letters, digits, '.', '_' or '-'")
    return prefix


def _objects(bucket: str, *prefixes: str) -> list[str]:
    """Object ARNs for everything under each prefix *as a directory*: ``p/*``, never ``p*``,
    which would also match the sibling ``v10`` of ``v1``."""
    return [f"arn:aws:s3:::{bucket}/{p}/*" for p in prefixes]


def _allow(sid: str, actions: list[str], resources: list[str], condition: dict[str, Any] | None = None) -> Policy:
    statement: Policy = {"Sid": sid, "Effect": "Allow", "Action": actions, "Resource": resources}
    if condition:
        statement["Condition"] = condition
    return statement


def _list_under(bucket: str, *prefixes: str) -> Policy:
    """ListBucket only where the listing's Prefix is one of these directories or inside one.

    The merge engine lists with ``Prefix=<prefix>/`` (``S3Store.list_files``), which ``p/*``
    matches (``*`` matches nothing too). A Prefix without the trailing slash is refused on
    purpose: ``base/m/v1`` would also list ``base/m/v10/``.
    """
    return _allow("ListOwnPrefixes", ["s3:ListBucket"], [f"arn:aws:s3:::{bucket}"],
                  {"StringLike": {"s3:prefix": [f"{p}/*" for p in prefixes]}})


def merge_session_policy(bucket: str, base_prefix: str, adapters_prefix: str, checkpoint_prefix: str) -> Policy:
    """The session policy for one merge run.

    - ``base_prefix`` (``base/<model>/v<k>``): read, the one base version this run merges onto;
    - ``adapters_prefix`` (``learners/<nsUid>/adapters``): read, this learner's adapters;
    - ``checkpoint_prefix`` (``learners/<nsUid>/checkpoints/v<N>``): the one version this run
      writes. The engine also reads it (a retried Job finds its own committed manifest and
      succeeds; the engine re-lists what it wrote before committing) and deletes from it (its
      uncommitted shards after a failure); neither grants more than PutObject there already does.

    Listing is allowed under those three prefixes only. No multipart listing of the bucket
    (the engine never lists uploads), no delete outside the target version, nothing on
    ``base/`` but reads of one version, nothing of any other learner.
    """
    bucket = _bucket(bucket)
    base = _prefix(base_prefix, "base prefix")
    adapters = _prefix(adapters_prefix, "adapters prefix")
    target = _prefix(checkpoint_prefix, "checkpoint prefix")
    return {"Version": VERSION, "Statement": [
        _allow("ReadInputs", ["s3:GetObject"], _objects(bucket, base, adapters)),
        _allow("WriteTargetVersion", ["s3:GetObject", "s3:DeleteObject", *_WRITE_OBJECT], _objects(bucket, target)),
        _list_under(bucket, base, adapters, target),
    ]}


def verify_session_policy(bucket: str, checkpoint_prefix: str) -> Policy:
    """Read-only access to one checkpoint version: enough to rehash it against its manifest."""
    bucket = _bucket(bucket)
    target = _prefix(checkpoint_prefix, "checkpoint prefix")
    return {"Version": VERSION, "Statement": [
        _allow("ReadCheckpoint", ["s3:GetObject"], _objects(bucket, target)),
        _list_under(bucket, target),
    ]}


def session_policy_json(policy: Policy) -> str:
    """The compact JSON to pass as AssumeRole's ``Policy``; refuses one the store would reject."""
    text = json.dumps(policy, separators=(",", ":"))
    if len(text.encode()) > MAX_SESSION_POLICY_BYTES:
        raise ValueError(f"session policy is {len(text.encode())} bytes; STS allows {MAX_SESSION_POLICY_BYTES}")
    return text


def session_duration_seconds(deadline_seconds: int, margin_seconds: int = DEFAULT_SESSION_MARGIN_SECONDS,
                             minimum: int = STS_MIN_DURATION_SECONDS,
                             maximum: int = STS_MAX_DURATION_SECONDS) -> int:
    """How long a run's credentials live: the Job's deadline plus a margin, within STS's bounds.

    Credentials should expire soon after the Job can no longer run, so a leaked token is short
    lived; they must not expire while it still can. Past ``maximum`` the second goal loses:
    a longer Job needs a longer role session (or refreshed credentials).
    """
    if deadline_seconds < 0 or margin_seconds < 0:
        raise ValueError("deadline and margin must not be negative")
    return max(minimum, min(deadline_seconds + margin_seconds, maximum))


def operator_policy(bucket: str, role_arn: str | None = None) -> Policy:
    """The operator's own identity: reads published bases, owns everything under ``learners/``
    and ``audit/``. It cannot write ``base/``: a compromised operator still cannot alter what
    every learner merges onto.

    On AWS the operator assumes a role (``role_arn``) to mint its runs' credentials, which its
    identity must be allowed to do. MinIO has no roles: any user may call AssumeRole for itself,
    and MinIO refuses a policy that names ``sts:AssumeRole``; so pass no ``role_arn`` there.
    """
    bucket = _bucket(bucket)
    statements = [
        _allow("ReadBases", ["s3:GetObject"], _objects(bucket, "base")),
        _allow("OwnLearnersAndAudit", ["s3:GetObject", "s3:DeleteObject", *_WRITE_OBJECT],
               _objects(bucket, "learners", "audit")),
        _allow("ListBucket", ["s3:ListBucket", "s3:ListBucketMultipartUploads"], [f"arn:aws:s3:::{bucket}"]),
    ]
    if role_arn:
        statements.append(_allow("MintRunCredentials", ["sts:AssumeRole"], [role_arn]))
    return {"Version": VERSION, "Statement": statements}


def publisher_policy(bucket: str) -> Policy:
    """Whoever publishes base models: writes, reads back (to seal a manifest) and deletes
    ``base/`` and nothing else."""
    bucket = _bucket(bucket)
    return {"Version": VERSION, "Statement": [
        _allow("PublishBases", ["s3:GetObject", "s3:DeleteObject", *_WRITE_OBJECT], _objects(bucket, "base")),
        _list_under(bucket, "base"),
    ]}
