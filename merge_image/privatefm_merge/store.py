"""Object storage behind one small interface: a local directory or an S3 prefix.

Torch-free (the operator uses it). Reads stream in bounded chunks; writes hash incrementally and,
on S3, upload as a multipart upload whose parts are sent as the bytes are produced, so no object
is ever held whole in memory. A writer commits on ``commit()`` and leaves nothing behind on
``abort()`` (the local backend writes to a hidden temporary name and renames; the S3 backend
aborts the multipart upload).

S3 upload checksums: **SHA-256**. Every object the S3 backend writes or copies carries an S3
checksum the store keeps and returns from ``HeadObject`` with ``ChecksumMode=ENABLED``
(:meth:`S3Store.head`):

* a single PUT (every object under the part size: configs, the index, the manifest) sends
  ``x-amz-checksum-sha256``, which S3 checks on receipt and keeps as a FULL_OBJECT checksum: it
  *is* the manifest's sha256 of the file, in base64, so a cheap check compares the two with no
  extra state (:func:`privatefm_merge.manifest.check_store_checksum`);
* a multipart upload sends each part's SHA-256 (S3 checks every part on receipt) and keeps a
  COMPOSITE checksum, ``base64(sha256(part digests))-<parts>``. The merge records that value in
  the manifest (``storeChecksum``), so the cheap check compares it too;
* a server-side copy (CopyObject, up to 5 GiB) asks for SHA-256 again and keeps a FULL_OBJECT
  checksum: the same as the source's. Above 5 GiB, a multipart UploadPartCopy keeps none: the
  copy reads no bytes here to checksum its parts, and MinIO (unlike S3) refuses part copies into
  a checksummed upload without them. The cheap check cannot check such a copy; the deep check
  rehashes it.

Why SHA-256 and not full-object CRC64NVME. CRC64NVME's one advantage is that S3 can combine part
CRCs into a full-object checksum independent of the part size. But a client must send every
part's CRC64NVME itself (MinIO and S3 refuse a part without it: "checksum missing, want
CRC64NVME"), and botocore computes CRC64NVME only through the optional ``awscrt`` native
package, which neither image ships; SHA-256 needs only ``hashlib``. And the project already
identifies every file by its sha256: for every single-PUT object, the store's checksum equals
the manifest's, with nothing new to record or compute. The cost is a second SHA-256 pass over
the bytes of multipart objects, run in the part-upload threads (in parallel with each other and
with the merge), and a composite rather than a full-object value for them, which is why the
merge records it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import secrets
import shutil
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Protocol

from privatefm_merge import layout
from privatefm_merge.contract import DEFAULT_S3_REGION, ENV_S3_ENDPOINT, ENV_S3_REGION
from privatefm_merge.errors import NotFoundError, StorageError

MiB = 1024 * 1024
READ_CHUNK = 8 * MiB
DEFAULT_PART_SIZE = 16 * MiB
MIN_PART_SIZE = 5 * MiB  # S3's minimum for every part but the last
MAX_PARTS = 10_000
PARTIAL_SUFFIX = ".privatefm-partial"


@dataclass(frozen=True)
class ObjectInfo:
    name: str  # relative to the store root, '/'-separated
    size: int


@dataclass(frozen=True)
class FileDigest:
    name: str
    size: int
    sha256: str
    # The checksum the store kept at upload (S3: the SHA-256 checksum, see the module docstring);
    # None where the store keeps none (a local directory).
    store_checksum: str | None = None


CHECKSUM_ALGORITHM = "SHA256"  # the S3 checksum algorithm of every upload and copy


@dataclass(frozen=True)
class ObjectStat:
    """What ``head`` reports: the size, and the checksum the store kept (None where it kept none)."""

    size: int
    checksum: str | None = None  # as S3 returns it: base64, with "-<parts>" for a COMPOSITE checksum
    algorithm: str | None = None  # e.g. "SHA256"; None with no checksum


class ReadStream(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...

    def close(self) -> None: ...


def _check_name(name: str) -> str:
    parts = name.split("/")
    if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid object name {name!r}")
    return name


def sha256_stream(stream: ReadStream, chunk: int = READ_CHUNK) -> tuple[int, str]:
    """(size, sha256 hex) of a stream, read in bounded chunks."""
    digest = hashlib.sha256()
    size = 0
    while block := stream.read(chunk):
        digest.update(block)
        size += len(block)
    return size, digest.hexdigest()


class ObjectWriter(ABC):
    """Streams one object, hashing as it goes. Use as a context manager or call commit/abort."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.size = 0
        self._sha = hashlib.sha256()
        self._done = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.hash(data)
        self.write_unhashed(data)

    # The two halves of ``write``, for callers that run them on separate threads (in order).
    def hash(self, data: bytes | bytearray | memoryview) -> None:
        self._sha.update(data)
        self.size += len(data)

    def write_unhashed(self, data: bytes | bytearray | memoryview) -> None:
        if self._done:
            raise StorageError(f"write to {self.name} after commit/abort")
        self._write(data)

    def commit(self) -> FileDigest:
        if self._done:
            raise StorageError(f"{self.name} already committed or aborted")
        try:
            self._commit()
        except BaseException:
            self.abort()
            raise
        self._done = True
        return FileDigest(self.name, self.size, self._sha.hexdigest(), self._store_checksum())

    def _store_checksum(self) -> str | None:
        """The checksum the store kept for the committed object, if any."""
        return None

    def abort(self) -> None:
        if not self._done:
            self._done = True
            with contextlib.suppress(Exception):
                self._abort()

    def __enter__(self) -> ObjectWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._done:
            self.commit()

    @abstractmethod
    def _write(self, data: bytes | bytearray | memoryview) -> None: ...

    @abstractmethod
    def _commit(self) -> None: ...

    @abstractmethod
    def _abort(self) -> None: ...


class Store(ABC):
    """A directory of named objects ('/'-separated names, relative to the store root)."""

    uri: str

    def child_uri(self, name: str) -> str:
        return f"{self.uri.rstrip('/')}/{name}"

    @abstractmethod
    def list_files(self, prefix: str = "") -> list[ObjectInfo]:
        """Every object under ``prefix`` (a sub-directory name, or '' for all), sorted by name."""

    @abstractmethod
    def list_dirs(self, prefix: str = "") -> list[str]:
        """The names of the immediate sub-directories of ``prefix`` ('' for the root), sorted."""

    @abstractmethod
    def stat(self, name: str) -> int | None:
        """The object's size, or None when it does not exist."""

    @abstractmethod
    def head(self, name: str) -> ObjectStat | None:
        """Size and stored checksum, or None when the object does not exist. One request on S3;
        no object bytes are read."""

    @abstractmethod
    def copy(self, src_name: str, dst_name: str, size: int | None = None) -> ObjectStat:
        """Copy an object within this store, server-side: no bytes pass through this process.
        ``size``: the source's size when known (saves a request). Raises NotFoundError when the
        source does not exist."""

    @abstractmethod
    def open_read(self, name: str) -> ReadStream:
        """A sequential stream over the object; raises NotFoundError when it does not exist."""

    @abstractmethod
    def read_range(self, name: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of the object."""

    @abstractmethod
    def open_write(self, name: str, size_hint: int | None = None) -> ObjectWriter:
        """A streaming writer; the object appears (atomically) only on commit."""

    @abstractmethod
    def delete(self, name: str) -> None:
        """Delete one object; no error when it does not exist."""

    @abstractmethod
    def delete_prefix(self, prefix: str = "") -> int:
        """Delete every object under ``prefix`` ('' = the whole store); returns how many."""

    @abstractmethod
    def _copy_within(self, source: Store, src_name: str, dst_name: str) -> bool:
        """Server-side copy when ``source`` lives in the same backend; False when not possible."""

    def exists(self, name: str) -> bool:
        return self.stat(name) is not None

    def digest(self, name: str) -> FileDigest:
        """Size and sha256 of one object, streamed in bounded chunks."""
        stream = self.open_read(name)
        try:
            size, sha = sha256_stream(stream)
        finally:
            stream.close()
        return FileDigest(name, size, sha)

    def read_bytes(self, name: str) -> bytes:
        stream = self.open_read(name)
        try:
            return stream.read()
        finally:
            stream.close()

    def put_bytes(self, name: str, data: bytes) -> FileDigest:
        writer = self.open_write(name, size_hint=len(data))
        try:
            writer.write(data)
        except BaseException:
            writer.abort()
            raise
        return writer.commit()

    def copy_from(self, source: Store, src_name: str, dst_name: str | None = None) -> ObjectStat:
        """Copy one object into this store: server-side where possible, else streamed. Returns
        the copy's size and stored checksum."""
        dst = dst_name or src_name
        if not self._copy_within(source, src_name, dst):
            stream = source.open_read(src_name)
            try:
                with self.open_write(dst, size_hint=source.stat(src_name)) as writer:
                    while block := stream.read(READ_CHUNK):
                        writer.write(block)
            finally:
                stream.close()
        stat = self.head(dst)
        if stat is None:
            raise StorageError(f"{self.child_uri(dst)} is missing right after the copy")
        return stat


# ---------------------------------------------------------------------------------------------
# Local directory


class _LocalWriter(ObjectWriter):
    def __init__(self, name: str, path: Path) -> None:
        super().__init__(name)
        self._path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}")
        self._file: IO[bytes] | None = open(self._tmp, "wb")  # noqa: SIM115 - closed in commit/abort

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        assert self._file is not None
        try:
            self._file.write(data)
        except OSError as err:
            raise StorageError(f"writing {self._path}: {err}") from err

    def _commit(self) -> None:
        assert self._file is not None
        try:
            self._file.close()
            self._file = None
            os.replace(self._tmp, self._path)
        except OSError as err:
            raise StorageError(f"committing {self._path}: {err}") from err

    def _abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._tmp.unlink(missing_ok=True)


class LocalStore(Store):
    def __init__(self, root: str | Path) -> None:
        self.root = Path(os.path.abspath(root))
        self.uri = str(self.root)

    def _path(self, name: str) -> Path:
        return self.root / _check_name(name)

    def list_files(self, prefix: str = "") -> list[ObjectInfo]:
        top = self.root / prefix.strip("/") if prefix.strip("/") else self.root
        found = []
        for dirpath, _, filenames in os.walk(top):
            for filename in filenames:
                if filename.endswith(PARTIAL_SUFFIX):
                    continue
                path = Path(dirpath) / filename
                found.append(ObjectInfo(path.relative_to(self.root).as_posix(), path.stat().st_size))
        return sorted(found, key=lambda o: o.name)

    def list_dirs(self, prefix: str = "") -> list[str]:
        top = self.root / prefix.strip("/") if prefix.strip("/") else self.root
        return sorted(p.name for p in top.iterdir() if p.is_dir()) if top.is_dir() else []

    def stat(self, name: str) -> int | None:
        try:
            st = self._path(name).stat()
        except FileNotFoundError:
            return None
        return st.st_size if not os.path.isdir(self._path(name)) else None

    def head(self, name: str) -> ObjectStat | None:
        size = self.stat(name)
        return None if size is None else ObjectStat(size)

    def copy(self, src_name: str, dst_name: str, size: int | None = None) -> ObjectStat:
        if not self.exists(src_name):
            raise NotFoundError(f"{self.child_uri(src_name)} does not exist")
        self._copy_within(self, src_name, dst_name)
        stat = self.head(dst_name)
        assert stat is not None
        return stat

    def open_read(self, name: str) -> ReadStream:
        try:
            return open(self._path(name), "rb")
        except FileNotFoundError:
            raise NotFoundError(f"{self.child_uri(name)} does not exist") from None
        except OSError as err:
            raise StorageError(f"reading {self.child_uri(name)}: {err}") from err

    def read_range(self, name: str, start: int, end: int) -> bytes:
        try:
            with open(self._path(name), "rb") as file:
                file.seek(start)
                data = file.read(end - start)
        except FileNotFoundError:
            raise NotFoundError(f"{self.child_uri(name)} does not exist") from None
        except OSError as err:
            raise StorageError(f"reading {self.child_uri(name)}: {err}") from err
        if len(data) != end - start:
            raise StorageError(f"{self.child_uri(name)}: short read at {start}..{end}")
        return data

    def open_write(self, name: str, size_hint: int | None = None) -> ObjectWriter:
        return _LocalWriter(name, self._path(name))

    def delete(self, name: str) -> None:
        self._path(name).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str = "") -> int:
        files = self.list_files(prefix)
        for info in files:
            self.delete(info.name)
        target = self.root / prefix.strip("/") if prefix.strip("/") else self.root
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        return len(files)

    def _copy_within(self, source: Store, src_name: str, dst_name: str) -> bool:
        if not isinstance(source, LocalStore):
            return False
        dst = self._path(dst_name)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}")
        shutil.copyfile(source._path(src_name), tmp)
        os.replace(tmp, dst)
        return True


# ---------------------------------------------------------------------------------------------
# S3


def make_s3_client(endpoint: str | None = None, region: str | None = None, access_key: str | None = None,
                   secret_key: str | None = None, session_token: str | None = None, *,
                   max_attempts: int = 5, timeout: float | None = None) -> Any:
    """The one boto3 S3 client factory: path-style addressing, bounded retries.

    Anything left None comes from boto3's default chain (``AWS_*`` variables, web identity / IRSA,
    instance profiles), which is how both merge pods and an operator on AWS are configured.
    """
    import boto3
    from botocore.config import Config

    options: dict[str, Any] = {
        "s3": {"addressing_style": "path"},
        "retries": {"max_attempts": max_attempts, "mode": "standard"},
        "max_pool_connections": 16,
    }
    if timeout is not None:  # botocore's default is 60 s for connect and for each read
        options.update(connect_timeout=timeout, read_timeout=timeout)
    try:  # botocore >= 1.36: only send/check the newer default checksums where required,
        # which S3-compatible stores do not all support.
        config = Config(**options, request_checksum_calculation="when_required",
                        response_checksum_validation="when_required")
    except TypeError:
        config = Config(**options)
    return boto3.client("s3", endpoint_url=endpoint or None, region_name=region or DEFAULT_S3_REGION,
                        aws_access_key_id=access_key or None, aws_secret_access_key=secret_key or None,
                        aws_session_token=session_token or None, config=config)


def s3_client_from_env(env: Mapping[str, str] | None = None) -> Any:
    """A client from the standard ``AWS_ENDPOINT_URL``/``AWS_REGION`` variables (credentials too)."""
    env = os.environ if env is None else env
    return make_s3_client(env.get(ENV_S3_ENDPOINT), env.get(ENV_S3_REGION))


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def _is_not_found(err: Exception) -> bool:
    response = getattr(err, "response", None)
    if not isinstance(response, dict):
        return False
    code = str(response.get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NotFound", "NoSuchUpload")


def _botocore_errors() -> tuple[type[Exception], ...]:
    from botocore.exceptions import BotoCoreError, ClientError

    return (ClientError, BotoCoreError)


class _S3ReadStream:
    """A GET body that resumes with a ranged GET when the connection breaks mid-object."""

    RETRIES = 3

    def __init__(self, store: S3Store, name: str) -> None:
        self._store = store
        self._name = name
        self._pos = 0
        self._body: Any = None
        self._size: int | None = None
        self._open()

    def _open(self) -> None:
        kwargs: dict[str, Any] = {"Bucket": self._store.bucket, "Key": self._store.key(self._name)}
        if self._pos:
            kwargs["Range"] = f"bytes={self._pos}-"
        try:
            response = self._store.client.get_object(**kwargs)
        except _botocore_errors() as err:
            if _is_not_found(err):
                raise NotFoundError(f"{self._store.child_uri(self._name)} does not exist") from None
            raise StorageError(f"reading {self._store.child_uri(self._name)}: {err}") from err
        if self._size is None:
            self._size = int(response["ContentLength"])
        self._body = response["Body"]

    def read(self, size: int = -1, /) -> bytes:
        assert self._size is not None
        if self._pos >= self._size:
            return b""
        for attempt in range(self.RETRIES + 1):
            try:
                data: bytes = self._body.read() if size < 0 else self._body.read(size)
            except Exception as err:  # a broken connection: resume where we are
                if attempt == self.RETRIES:
                    raise StorageError(f"reading {self._store.child_uri(self._name)}: {err}") from err
                self.close()
                self._open()
                continue
            self._pos += len(data)
            if not data and self._pos < self._size:
                raise StorageError(f"{self._store.child_uri(self._name)}: stream ended early at {self._pos}")
            return data
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._body is not None:
            with contextlib.suppress(Exception):
                self._body.close()
            self._body = None


class _S3Writer(ObjectWriter):
    """Multipart upload whose parts are sent (a few at a time) as the bytes are produced."""

    def __init__(self, store: S3Store, name: str, part_size: int, concurrency: int = 4) -> None:
        super().__init__(name)
        self._store = store
        self._key = store.key(name)
        self._part_size = part_size
        self._concurrency = concurrency
        self._buf = bytearray()
        self._upload_id: str | None = None
        self._parts: dict[int, dict[str, Any]] = {}  # number -> PartNumber, ETag, ChecksumSHA256
        self._checksum: str | None = None  # what the store kept, once committed
        self._parts_sent = 0
        self._pending: set[Future[None]] = set()
        self._pool: ThreadPoolExecutor | None = None

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data
        while len(self._buf) >= self._part_size:
            with memoryview(self._buf) as view:
                part = bytes(view[: self._part_size])
            del self._buf[: self._part_size]
            self._send(part)

    def _send(self, part: bytes) -> None:
        client = self._store.client
        try:
            if self._upload_id is None:
                created = client.create_multipart_upload(Bucket=self._store.bucket, Key=self._key,
                                                         ChecksumAlgorithm=CHECKSUM_ALGORITHM)
                self._upload_id = created["UploadId"]
                self._pool = ThreadPoolExecutor(self._concurrency, thread_name_prefix="s3-part")
        except _botocore_errors() as err:
            raise StorageError(f"starting upload of {self._store.child_uri(self.name)}: {err}") from err
        assert self._pool is not None
        while len(self._pending) >= self._concurrency:
            done, self._pending = wait(self._pending, return_when=FIRST_COMPLETED)
            for future in done:
                future.result()
        self._parts_sent += 1
        number = self._parts_sent
        self._pending.add(self._pool.submit(self._upload_part, number, part))

    def _upload_part(self, number: int, part: bytes) -> None:
        checksum = _b64(hashlib.sha256(part).digest())  # S3 checks the part against it on receipt
        try:
            response = self._store.client.upload_part(
                Bucket=self._store.bucket, Key=self._key, UploadId=self._upload_id,
                PartNumber=number, Body=part, ChecksumSHA256=checksum)
        except _botocore_errors() as err:
            where = self._store.child_uri(self.name)
            raise StorageError(f"uploading part {number} of {where}: {err}") from err
        self._parts[number] = {"PartNumber": number, "ETag": response["ETag"], "ChecksumSHA256": checksum}

    def _commit(self) -> None:
        client = self._store.client
        if self._upload_id is None:  # small object: one PUT, whose checksum is the object's sha256
            body = bytes(self._buf)
            self._checksum = _b64(hashlib.sha256(body).digest())
            try:
                client.put_object(Bucket=self._store.bucket, Key=self._key, Body=body,
                                  ChecksumSHA256=self._checksum)
            except _botocore_errors() as err:
                raise StorageError(f"writing {self._store.child_uri(self.name)}: {err}") from err
            self._buf = bytearray()
            return
        if self._buf:
            self._send(bytes(self._buf))
            self._buf = bytearray()
        for future in self._pending:
            future.result()
        self._pending = set()
        parts = [self._parts[n] for n in sorted(self._parts)]
        try:
            response = client.complete_multipart_upload(Bucket=self._store.bucket, Key=self._key,
                                                        UploadId=self._upload_id, MultipartUpload={"Parts": parts})
        except _botocore_errors() as err:
            raise StorageError(f"completing upload of {self._store.child_uri(self.name)}: {err}") from err
        self._checksum = response.get("ChecksumSHA256")
        self._upload_id = None
        self._shutdown()

    def _store_checksum(self) -> str | None:
        return self._checksum

    def _abort(self) -> None:
        for future in self._pending:
            future.cancel()
        wait(self._pending)
        self._pending = set()
        self._shutdown()
        self._buf = bytearray()
        if self._upload_id is not None:
            self._store.client.abort_multipart_upload(Bucket=self._store.bucket, Key=self._key,
                                                      UploadId=self._upload_id)
            self._upload_id = None

    def _shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


class S3Store(Store):
    def __init__(self, client: Any, bucket: str, prefix: str, part_size: int = DEFAULT_PART_SIZE) -> None:
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"S3 part size must be at least {MIN_PART_SIZE} bytes")
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.part_size = part_size
        self.uri = layout.s3_uri(bucket, self.prefix)

    def key(self, name: str) -> str:
        name = _check_name(name)
        return f"{self.prefix}/{name}" if self.prefix else name

    def _list_prefix(self, prefix: str) -> str:
        sub = prefix.strip("/")
        base = f"{self.prefix}/{sub}" if sub and self.prefix else (sub or self.prefix)
        return f"{base}/" if base else ""

    def list_files(self, prefix: str = "") -> list[ObjectInfo]:
        key_prefix = self._list_prefix(prefix)
        strip = len(f"{self.prefix}/") if self.prefix else 0
        found = []
        try:
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=key_prefix):
                for item in page.get("Contents", []):
                    found.append(ObjectInfo(item["Key"][strip:], int(item["Size"])))
        except _botocore_errors() as err:
            raise StorageError(f"listing {self.uri}: {err}") from err
        return sorted(found, key=lambda o: o.name)

    def list_dirs(self, prefix: str = "") -> list[str]:
        key_prefix = self._list_prefix(prefix)
        found = []
        try:
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=key_prefix, Delimiter="/"):
                found += [p["Prefix"][len(key_prefix):].rstrip("/") for p in page.get("CommonPrefixes", [])]
        except _botocore_errors() as err:
            raise StorageError(f"listing {self.uri}/{key_prefix}: {err}") from err
        return sorted(found)

    def stat(self, name: str) -> int | None:
        try:
            response = self.client.head_object(Bucket=self.bucket, Key=self.key(name))
        except _botocore_errors() as err:
            if _is_not_found(err):
                return None
            raise StorageError(f"stat {self.child_uri(name)}: {err}") from err
        return int(response["ContentLength"])

    def head(self, name: str) -> ObjectStat | None:
        try:
            response = self.client.head_object(Bucket=self.bucket, Key=self.key(name), ChecksumMode="ENABLED")
        except _botocore_errors() as err:
            if _is_not_found(err):
                return None
            raise StorageError(f"stat {self.child_uri(name)}: {err}") from err
        for algorithm in ("SHA256", "CRC64NVME", "CRC32C", "CRC32", "SHA1"):  # ours first; any other kept one
            if response.get(f"Checksum{algorithm}"):
                return ObjectStat(int(response["ContentLength"]), response[f"Checksum{algorithm}"], algorithm)
        return ObjectStat(int(response["ContentLength"]))

    def copy(self, src_name: str, dst_name: str, size: int | None = None) -> ObjectStat:
        """CopyObject with a SHA-256 checksum, or a multipart UploadPartCopy (without one) above
        ``COPY_LIMIT``, S3's 5 GiB limit for one copy (see the module docstring). Names are
        relative to this store's prefix: a store at the bucket root copies between any keys."""
        return self._server_copy(self.bucket, self.key(src_name), self.child_uri(src_name), dst_name, size)

    # S3 copies at most 5 GiB in one request, and copies larger objects in parts of at most 5 GiB.
    COPY_LIMIT = 5 * 1024 * MiB
    COPY_PART_SIZE = 1024 * MiB

    def _server_copy(self, src_bucket: str, src_key: str, src_uri: str, dst_name: str,
                     size: int | None) -> ObjectStat:
        source = {"Bucket": src_bucket, "Key": src_key}
        dst_key = self.key(dst_name)
        try:
            if size is None:
                size = int(self.client.head_object(**source)["ContentLength"])
            if size <= self.COPY_LIMIT:
                self.client.copy_object(Bucket=self.bucket, Key=dst_key, CopySource=source,
                                        ChecksumAlgorithm=CHECKSUM_ALGORITHM)
            else:
                self._copy_in_parts(source, dst_key, size)
        except _botocore_errors() as err:
            if _is_not_found(err):
                raise NotFoundError(f"{src_uri} does not exist") from None
            raise StorageError(f"copying {src_uri} to {self.child_uri(dst_name)}: {err}") from err
        stat = self.head(dst_name)
        if stat is None or stat.size != size:
            raise StorageError(f"copying {src_uri} to {self.child_uri(dst_name)}: the copy has "
                               f"{stat.size if stat else 'no'} bytes, expected {size}")
        return stat

    def _copy_in_parts(self, source: dict[str, str], dst_key: str, size: int) -> None:
        # No checksum algorithm here: a part copy has no bytes to checksum on this side, and MinIO
        # refuses a part copy into a checksummed upload without one; such a copy has no store
        # checksum, and the cheap check skips it (the deep check rehashes it).
        part_size = max(min(self.COPY_PART_SIZE, self.COPY_LIMIT), -(-size // (MAX_PARTS - 100)))
        upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=dst_key)["UploadId"]

        def copy_part(number: int) -> dict[str, Any]:
            first = (number - 1) * part_size
            last = min(size, first + part_size) - 1
            result = self.client.upload_part_copy(Bucket=self.bucket, Key=dst_key, UploadId=upload_id,
                                                  PartNumber=number, CopySource=source,
                                                  CopySourceRange=f"bytes={first}-{last}")["CopyPartResult"]
            return {"PartNumber": number, "ETag": result["ETag"]}

        try:
            with ThreadPoolExecutor(4, thread_name_prefix="s3-copy") as pool:
                parts = list(pool.map(copy_part, range(1, -(-size // part_size) + 1)))
            self.client.complete_multipart_upload(Bucket=self.bucket, Key=dst_key, UploadId=upload_id,
                                                  MultipartUpload={"Parts": parts})
        except BaseException:
            with contextlib.suppress(Exception):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=dst_key, UploadId=upload_id)
            raise

    def open_read(self, name: str) -> ReadStream:
        return _S3ReadStream(self, name)

    def read_range(self, name: str, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self.key(name),
                                              Range=f"bytes={start}-{end - 1}")
            data: bytes = response["Body"].read()
        except _botocore_errors() as err:
            if _is_not_found(err):
                raise NotFoundError(f"{self.child_uri(name)} does not exist") from None
            raise StorageError(f"reading {self.child_uri(name)} bytes {start}..{end}: {err}") from err
        if len(data) != end - start:
            raise StorageError(f"{self.child_uri(name)}: short read at {start}..{end}")
        return data

    def open_write(self, name: str, size_hint: int | None = None) -> ObjectWriter:
        part_size = self.part_size
        if size_hint:  # stay under S3's 10,000-part limit
            part_size = max(part_size, -(-size_hint // (MAX_PARTS - 100)))
        return _S3Writer(self, name, part_size)

    def delete(self, name: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key(name))
        except _botocore_errors() as err:
            if not _is_not_found(err):
                raise StorageError(f"deleting {self.child_uri(name)}: {err}") from err

    def delete_prefix(self, prefix: str = "") -> int:
        """Deletes the objects and aborts unfinished multipart uploads under ``prefix``."""
        key_prefix = self._list_prefix(prefix)
        names = [o.name for o in self.list_files(prefix)]
        keys = [self.key(n) for n in names]
        try:
            for i in range(0, len(keys), 1000):
                batch = [{"Key": k} for k in keys[i: i + 1000]]
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            self.abort_uploads(prefix, names)
        except _botocore_errors() as err:
            raise StorageError(f"deleting {self.uri}/{key_prefix}: {err}") from err
        return len(keys)

    def incomplete_uploads(self, prefix: str = "", names: Iterable[str] = ()) -> list[dict[str, Any]]:
        """Unfinished multipart uploads under ``prefix`` and of the objects ``names`` (each with Key
        and UploadId). ``names`` is for stores that list uploads of one exact key only (MinIO
        answers a directory prefix with nothing), so a caller that knows its keys finds them there too."""
        found: dict[str, dict[str, Any]] = {}
        paginator = self.client.get_paginator("list_multipart_uploads")
        for key_prefix in (self._list_prefix(prefix), *(self.key(n) for n in names)):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=key_prefix):
                found.update({u["UploadId"]: u for u in page.get("Uploads", [])})
        return list(found.values())

    def abort_uploads(self, prefix: str = "", names: Iterable[str] = ()) -> int:
        """Aborts what ``incomplete_uploads`` finds; returns how many."""
        try:
            uploads = self.incomplete_uploads(prefix, names)
            for upload in uploads:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        except _botocore_errors() as err:
            raise StorageError(f"aborting uploads under {self.uri}/{prefix}: {err}") from err
        return len(uploads)

    def _copy_within(self, source: Store, src_name: str, dst_name: str) -> bool:
        same_endpoint = isinstance(source, S3Store) and \
            source.client.meta.endpoint_url == self.client.meta.endpoint_url
        if not isinstance(source, S3Store) or not same_endpoint:
            return False
        self._server_copy(source.bucket, source.key(src_name), source.child_uri(src_name), dst_name, None)
        return True


def open_store(uri: str, s3_client: Any = None, part_size: int = DEFAULT_PART_SIZE) -> Store:
    """The store at ``uri``: ``s3://bucket/prefix`` (with ``s3_client`` or one from the
    environment) or a local directory (``file://`` optional)."""
    if layout.is_s3_uri(uri):
        bucket, prefix = layout.parse_s3_uri(uri)
        return S3Store(s3_client if s3_client is not None else s3_client_from_env(), bucket, prefix, part_size)
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return LocalStore(uri)
