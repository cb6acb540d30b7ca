"""The merge engine against the real S3 server (MinIO), through the lead's ``s3`` fixture.

No mocks: objects are really uploaded, multipart uploads really started, and a merge process is
really killed mid-upload.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from merge_testlib import make_adapter, read_tensors, save_base, tiny_llama
from peft import LoraConfig
from privatefm_merge.contract import AdapterRef, MergeJob, MergeResult
from privatefm_merge.engine import MergeOptions, merge_checkpoint
from privatefm_merge.errors import NotFoundError
from privatefm_merge.manifest import FileEntry, check_store_checksum, full_object_checksum
from privatefm_merge.seal import seal_checkpoint
from privatefm_merge.store import LocalStore, MiB, ObjectStat, S3Store, open_store
from privatefm_merge.verify import NO_MANIFEST, verify_checkpoint
from safetensors.torch import save_file

pytestmark = pytest.mark.cluster

CLI = str(Path(sys.executable).parent / "privatefm-merge")


def s3_env(s3: Any) -> dict[str, str]:
    return dict(s3.env())


def upload_dir(client: Any, bucket: str, prefix: str, directory: Path) -> None:
    for path in sorted(directory.iterdir()):
        client.upload_file(str(path), bucket, f"{prefix}/{path.name}")


def run_cli(s3: Any, args: list[str], env: dict[str, str] | None = None, **kwargs: Any) -> Any:
    full = {**{k: v for k, v in os.environ.items() if not k.startswith(("PRIVATEFM_", "AWS_"))},
            **s3_env(s3), **(env or {})}
    return subprocess.run([CLI, *args], env=full, capture_output=True, text=True, timeout=300, **kwargs)


@pytest.fixture
def prefix(s3: Any, s3_prefix: str) -> Iterator[str]:
    prefix = s3_prefix.strip("/")
    yield prefix
    S3Store(s3.client(), s3.bucket, prefix).delete_prefix()  # objects and unfinished uploads


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny sharded bf16 Llama base, a DoRA adapter, and the local merge of the two."""
    root = tmp_path_factory.mktemp("s3src")
    model = tiny_llama(torch.bfloat16)
    save_base(model, root / "base")
    make_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                                   use_dora=True), root / "adapter")
    merge_checkpoint(str(root / "base"), str(root / "adapter"), str(root / "local-out"),
                     MergeOptions(device="cpu"))
    return root


def test_s3_store_streams_multipart_and_copies_server_side(s3: Any, prefix: str) -> None:
    client = s3.client()
    store = S3Store(client, s3.bucket, f"{prefix}/store", part_size=5 * MiB)
    payload = os.urandom(12 * MiB + 123)  # three parts, the last one short
    writer = store.open_write("dir/blob.bin")
    for start in range(0, len(payload), 1_000_000):
        writer.write(payload[start: start + 1_000_000])
    assert not store.exists("dir/blob.bin"), "invisible until the multipart upload completes"
    assert len(store.incomplete_uploads(names=["dir/blob.bin"])) == 1
    digest = writer.commit()
    assert digest.size == len(payload) and digest.sha256 == hashlib.sha256(payload).hexdigest()
    assert store.read_range("dir/blob.bin", 5 * MiB - 3, 5 * MiB + 3) == payload[5 * MiB - 3: 5 * MiB + 3]
    stream = store.open_read("dir/blob.bin")
    assert stream.read() == payload
    stream.close()
    assert store.incomplete_uploads(names=["dir/blob.bin"]) == []

    aborted = store.open_write("dir/aborted.bin")
    aborted.write(os.urandom(6 * MiB))
    aborted.abort()
    assert not store.exists("dir/aborted.bin") and store.incomplete_uploads(names=["dir/aborted.bin"]) == []

    other = S3Store(client, s3.bucket, f"{prefix}/copy")
    other.copy_from(store, "dir/blob.bin", "blob-copy.bin")  # CopyObject: no bytes through us
    assert other.read_bytes("blob-copy.bin") == payload
    assert [(o.name, o.size) for o in store.list_files()] == [("dir/blob.bin", len(payload))]
    assert store.delete_prefix() == 1 and store.list_files() == []


def test_uploads_carry_a_sha256_checksum_the_store_keeps(s3: Any, prefix: str) -> None:
    """Single PUT: a FULL_OBJECT SHA-256, the object's sha256. Multipart: S3 checks every part's
    SHA-256 and keeps a COMPOSITE one, which the writer reports for the manifest."""
    store = S3Store(s3.client(), s3.bucket, f"{prefix}/sums", part_size=5 * MiB)
    small = os.urandom(1000)
    small_digest = store.put_bytes("small.bin", small)
    stat = store.head("small.bin")
    assert stat == ObjectStat(1000, full_object_checksum(hashlib.sha256(small).hexdigest()), "SHA256")
    assert stat.checksum == small_digest.store_checksum
    assert FileEntry.of(small_digest).store_checksum is None  # it follows from the sha256

    big = os.urandom(12 * MiB + 5)  # three parts
    writer = store.open_write("big.bin")
    for start in range(0, len(big), 3 * MiB):
        writer.write(big[start: start + 3 * MiB])
    big_digest = writer.commit()
    stat = store.head("big.bin")
    assert stat is not None and stat.size == len(big) and stat.algorithm == "SHA256"
    assert stat.checksum is not None and stat.checksum.endswith("-3")  # COMPOSITE over three parts
    parts = [hashlib.sha256(big[i: i + 5 * MiB]).digest() for i in range(0, len(big), 5 * MiB)]
    assert stat.checksum == full_object_checksum(hashlib.sha256(b"".join(parts)).hexdigest()) + "-3"

    entry = FileEntry.of(big_digest)
    assert big_digest.store_checksum == entry.store_checksum == stat.checksum  # recorded for the manifest
    assert check_store_checksum(entry, stat) is None

    small_entry = FileEntry.of(small_digest)
    assert check_store_checksum(small_entry, ObjectStat(1000, small_digest.store_checksum, "SHA256")) is None
    store.put_bytes("small.bin", b"replaced behind the manifest's back")
    replaced = store.head("small.bin")
    assert replaced is not None
    problem = check_store_checksum(small_entry, replaced)
    assert problem is not None and problem.name == "small.bin" and "store checksum mismatch" in problem.detail
    assert store.head("missing.bin") is None


def test_server_side_copy_keeps_bytes_and_checksum(s3: Any, prefix: str, tmp_path: Path) -> None:
    store = S3Store(s3.client(), s3.bucket, prefix, part_size=5 * MiB)
    small = os.urandom(4000)
    store.put_bytes("base/x/config.json", small)
    copied = store.copy("base/x/config.json", "learners/u/checkpoints/v1/config.json")
    assert store.read_bytes("learners/u/checkpoints/v1/config.json") == small
    assert copied == store.head("base/x/config.json") == store.head("learners/u/checkpoints/v1/config.json")
    assert copied.checksum == full_object_checksum(hashlib.sha256(small).hexdigest())

    # Above the single-copy limit (5 GiB on S3; lowered here), UploadPartCopy in parts.
    big = os.urandom(11 * MiB)
    store.put_bytes("base/x/shard.bin", big)
    store.COPY_LIMIT, store.COPY_PART_SIZE = 8 * MiB, 5 * MiB  # type: ignore[misc]
    copied = store.copy("base/x/shard.bin", "learners/u/checkpoints/v1/shard.bin", size=len(big))
    assert store.read_bytes("learners/u/checkpoints/v1/shard.bin") == big
    assert copied.size == len(big)
    if copied.algorithm == "SHA256":  # S3 checksums part copies itself; MinIO keeps none for them
        assert copied.checksum is not None and copied.checksum.endswith("-3")
    assert store.incomplete_uploads("learners") == [] and store.incomplete_uploads(
        names=["learners/u/checkpoints/v1/shard.bin"]) == []
    with pytest.raises(NotFoundError):
        store.copy("base/x/nothing.bin", "learners/u/checkpoints/v1/nothing.bin")
    local = LocalStore(tmp_path)  # the local store has the same two calls, without checksums
    local.put_bytes("a/one.bin", small)
    assert local.copy("a/one.bin", "b/one.bin") == ObjectStat(len(small)) == local.head("b/one.bin")
    assert local.read_bytes("b/one.bin") == small and local.head("nothing") is None


def test_merge_s3_to_s3_then_verify_and_detect_a_flipped_byte(s3: Any, prefix: str, tiny: Path,
                                                              tmp_path: Path) -> None:
    client = s3.client()
    base_key, adapter_key = f"{prefix}/base/tiny/v1", f"{prefix}/learners/u1/adapters/1"
    out_key = f"{prefix}/learners/u1/checkpoints/v1"
    upload_dir(client, s3.bucket, base_key, tiny / "base")
    upload_dir(client, s3.bucket, adapter_key, tiny / "adapter")
    seal_checkpoint(f"s3://{s3.bucket}/{base_key}", version=1, s3_client=client)

    job = MergeJob(base_uri=f"s3://{s3.bucket}/{base_key}", adapters=(AdapterRef(1, f"s3://{s3.bucket}/{adapter_key}"),),
                   output_uri=f"s3://{s3.bucket}/{out_key}", base_model="tiny", base_version=1,
                   parent_version=None, target_version=1, device="auto")
    result_path = tmp_path / "result.json"
    proc = run_cli(s3, ["pod"], env={**job.to_env(), "PRIVATEFM_RESULT_PATH": str(result_path)})
    assert proc.returncode == 0, proc.stderr
    result = MergeResult.from_json(result_path.read_text())
    assert result.status == "Succeeded" and result.output_uri == job.output_uri

    report = verify_checkpoint(job.output_uri, s3_client=client)
    assert report.ok, report.message
    assert report.manifest_sha256 == result.manifest_sha256
    assert report.bytes_read == report.total_bytes > 0
    # The operator's acceptance: the store's upload checksums stand for the bytes, none are read.
    trusted = verify_checkpoint(job.output_uri, s3_client=client, trust_store_checksums=True)
    assert trusted.ok and trusted.bytes_read == 0, trusted.message
    assert report.manifest is not None and report.manifest.base is not None
    assert report.manifest.base.manifest_sha256 is not None  # the sealed base's manifest is recorded
    # Byte-identical to the same merge done on local files.
    local = {p.name: p.read_bytes() for p in (tiny / "local-out").iterdir() if p.name != "manifest.json"}
    remote = open_store(job.output_uri, client)
    assert {o.name for o in remote.list_files()} == {*local, "manifest.json"}
    for name, content in local.items():
        assert remote.read_bytes(name) == content, name

    # Flip one byte of one object: verify names that file, and only that file.
    shard = sorted(n for n in local if n.endswith(".safetensors"))[-1]
    data = bytearray(remote.read_bytes(shard))
    data[len(data) - 5] ^= 0x40
    client.put_object(Bucket=s3.bucket, Key=f"{out_key}/{shard}", Body=bytes(data))
    report = verify_checkpoint(job.output_uri, s3_client=client)
    assert not report.ok and report.bad_files == [shard] and report.problems[0].reason == "sha256"
    # Trusting the store: the overwrite kept no checksum, so that one file is read, and found bad.
    trusted = verify_checkpoint(job.output_uri, s3_client=client, trust_store_checksums=True)
    assert not trusted.ok and trusted.bad_files == [shard]
    assert trusted.bytes_read == len(data)
    # Overwritten again with a checksum of the new bytes: the store's checksum no longer matches the
    # manifest, found by a HEAD, no bytes read.
    client.put_object(Bucket=s3.bucket, Key=f"{out_key}/{shard}", Body=bytes(data), ChecksumAlgorithm="SHA256")
    trusted = verify_checkpoint(job.output_uri, s3_client=client, trust_store_checksums=True)
    assert not trusted.ok and trusted.bad_files == [shard] and trusted.bytes_read == 0
    assert "store checksum mismatch" in trusted.problems[0].detail
    proc = run_cli(s3, ["verify", job.output_uri])
    assert proc.returncode == 1 and f"bad file {shard}: sha256 mismatch" in proc.stderr


def test_output_under_base_is_refused_on_s3(s3: Any, prefix: str, tiny: Path) -> None:
    client = s3.client()
    upload_dir(client, s3.bucket, f"{prefix}/base/tiny/v1", tiny / "base")
    upload_dir(client, s3.bucket, f"{prefix}/learners/u1/adapters/1", tiny / "adapter")
    proc = run_cli(s3, ["--base", f"s3://{s3.bucket}/{prefix}/base/tiny/v1",
                        "--adapter", f"s3://{s3.bucket}/{prefix}/learners/u1/adapters/1",
                        "--output", f"s3://{s3.bucket}/{prefix}/base/tiny/v2"])
    assert proc.returncode == 1 and json.loads(proc.stdout)["reason"] == "OutputForbidden"
    assert open_store(f"s3://{s3.bucket}/{prefix}/base/tiny/v2", client).list_files() == []


def _big_base(directory: Path) -> None:
    """~96 MiB of Llama-named float32 tensors in two shards, and a LoRA on all of them."""
    directory.mkdir()
    adapter = directory / "adapter"
    adapter.mkdir()
    gen = torch.Generator().manual_seed(0)
    lora: dict[str, torch.Tensor] = {}
    weight_map = {}
    for shard in (1, 2):
        tensors = {}
        for layer in range(3):
            name = f"model.layers.{(shard - 1) * 3 + layer}.mlp.up_proj"
            tensors[f"{name}.weight"] = torch.randn(2048, 2048, generator=gen)
            lora[f"base_model.model.{name}.lora_A.weight"] = torch.randn(8, 2048, generator=gen) * 0.01
            lora[f"base_model.model.{name}.lora_B.weight"] = torch.randn(2048, 8, generator=gen) * 0.01
        file = f"model-0000{shard}-of-00002.safetensors"
        save_file(tensors, str(directory / file))
        weight_map.update({k: file for k in tensors})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    save_file(lora, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "bias": "none", "target_modules": ["up_proj"]}))


def test_merge_killed_mid_upload_leaves_no_version(s3: Any, prefix: str, tmp_path: Path) -> None:
    client = s3.client()
    _big_base(tmp_path / "src")
    adapter_dir = tmp_path / "src/adapter"
    base_key, adapter_key = f"{prefix}/base/big/v1", f"{prefix}/learners/u2/adapters/1"
    out_key = f"{prefix}/learners/u2/checkpoints/v4"
    for path in (tmp_path / "src").glob("model*"):
        client.upload_file(str(path), s3.bucket, f"{base_key}/{path.name}")
    upload_dir(client, s3.bucket, adapter_key, adapter_dir)
    job = MergeJob(base_uri=f"s3://{s3.bucket}/{base_key}", adapters=(AdapterRef(1, f"s3://{s3.bucket}/{adapter_key}"),),
                   output_uri=f"s3://{s3.bucket}/{out_key}", base_model="big", base_version=1, parent_version=3,
                   target_version=4, device="cpu")
    env = {**job.to_env(), "PRIVATEFM_RESULT_PATH": str(tmp_path / "result.json"),
           "PRIVATEFM_PART_SIZE_BYTES": str(5 * MiB)}
    full = {**{k: v for k, v in os.environ.items() if not k.startswith(("PRIVATEFM_", "AWS_"))}, **s3_env(s3), **env}
    proc = subprocess.Popen([CLI, "pod"], env=full, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # The output keeps the base's shard names. MinIO lists uploads of one exact key only.
    out, out_names = S3Store(client, s3.bucket, out_key), sorted(p.name for p in (tmp_path / "src").glob("model*"))
    parts_seen = 0
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and not parts_seen:
            for upload in out.incomplete_uploads(names=out_names):
                parts = client.list_parts(Bucket=s3.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                parts_seen = max(parts_seen, len(parts.get("Parts", [])))
            time.sleep(0.01)
        assert parts_seen, "the merge finished (or stalled) before a part was uploaded; cannot test the kill"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3.bucket, Prefix=out_key).get("Contents", [])]
    assert f"{out_key}/manifest.json" not in keys
    report = verify_checkpoint(job.output_uri, s3_client=client)
    assert not report.exists and report.message == NO_MANIFEST
    assert out.incomplete_uploads(names=out_names), "the killed upload is left unfinished, never completed"

    # The Job's retry starts over and commits.
    proc2 = subprocess.run([CLI, "pod"], env=full, capture_output=True, text=True, timeout=300)
    assert proc2.returncode == 0, proc2.stderr
    report = verify_checkpoint(job.output_uri, s3_client=client)
    assert report.ok and report.file_count == 3
    assert report.manifest is not None and report.manifest.parent_version == 3
    # The cheap check: every file's store checksum matches the manifest; the multipart shards'
    # COMPOSITE checksums are recorded in it.
    for entry in report.manifest.files:
        stat = out.head(entry.name)
        assert stat is not None and stat.algorithm == "SHA256", entry.name
        assert check_store_checksum(entry, stat) is None, entry.name
        assert (entry.store_checksum is not None) == stat.checksum.endswith(tuple(f"-{n}" for n in range(1, 99)))
    merged = read_tensors_s3(client, s3.bucket, out_key, tmp_path / "dl")
    base = read_tensors(tmp_path / "src")
    assert merged.keys() == base.keys() and all(not torch.equal(merged[k], base[k]) for k in base)


def read_tensors_s3(client: Any, bucket: str, key_prefix: str, directory: Path) -> dict[str, torch.Tensor]:
    directory.mkdir()
    for item in client.list_objects_v2(Bucket=bucket, Prefix=f"{key_prefix}/")["Contents"]:
        if item["Key"].endswith(".safetensors"):
            client.download_file(bucket, item["Key"], str(directory / item["Key"].rsplit("/", 1)[1]))
    return read_tensors(directory)


def test_clone_base_to_a_learner_checkpoint_server_side(s3: Any, prefix: str, tiny: Path) -> None:
    """The fallback re-clone: the latest base, copied by the S3 server, committed as a new version."""
    from privatefm_merge.seal import clone_checkpoint

    client = s3.client()
    base_uri = f"s3://{s3.bucket}/{prefix}/base/tiny/v2"
    upload_dir(client, s3.bucket, f"{prefix}/base/tiny/v2", tiny / "base")
    _, base_sha = seal_checkpoint(base_uri, version=2, s3_client=client)
    target = f"s3://{s3.bucket}/{prefix}/learners/u3/checkpoints/v5"
    manifest, digest = clone_checkpoint(base_uri, target, version=5, parent_version=4, base_model="tiny",
                                        base_version=2, s3_client=client)
    report = verify_checkpoint(target, s3_client=client)
    assert report.ok and report.manifest_sha256 == digest
    assert manifest.base is not None and manifest.base.manifest_sha256 == base_sha
    assert sorted(f.name for f in manifest.files) == sorted(p.name for p in (tiny / "base").iterdir())
    copies = open_store(target, client)
    for entry in manifest.files:  # each copy carries a FULL_OBJECT SHA-256 the cheap check can use
        stat = copies.head(entry.name)
        assert stat is not None and stat.algorithm == "SHA256" and check_store_checksum(entry, stat) is None
