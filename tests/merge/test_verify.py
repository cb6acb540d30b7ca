"""Verification against manifest.json (local store), the manifest's content, and the CLI."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from merge_testlib import make_adapter, save_base, tiny_llama
from peft import LoraConfig
from privatefm_merge.cli import main
from privatefm_merge.engine import MergeOptions, merge_checkpoint
from privatefm_merge.seal import seal_checkpoint
from privatefm_merge.verify import NO_MANIFEST, ManifestNotFound, read_manifest, verify_checkpoint


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("merged")
    model = tiny_llama(torch.bfloat16)
    save_base(model, root / "base")
    seal_checkpoint(str(root / "base"), version=3)
    make_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "gate_proj"]),
                 root / "adapter")
    merge_checkpoint(str(root / "base"), str(root / "adapter"), str(root / "out"),
                     MergeOptions(version=7, parent_version=6, base_model="tiny", base_version=3))
    yield root


@pytest.fixture
def checkpoint(tmp_path: Path, merged: Path) -> Path:
    shutil.copytree(merged / "out", tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_manifest_content(merged: Path) -> None:
    out = merged / "out"
    data = (out / "manifest.json").read_bytes()
    doc = json.loads(data)
    assert doc["formatVersion"] == 1
    assert doc["tool"]["name"] == "privatefm-merge" and doc["tool"]["version"]
    assert doc["createdAt"].endswith("Z")
    assert (doc["version"], doc["parentVersion"]) == (7, 6)
    base_manifest_sha = hashlib.sha256((merged / "base/manifest.json").read_bytes()).hexdigest()
    assert doc["base"] == {"uri": str(merged / "base"), "model": "tiny", "version": 3,
                           "manifestSha256": base_manifest_sha}
    assert verify_checkpoint(str(merged / "base")).ok  # a sealed base verifies like a checkpoint
    assert "adapter" not in doc and doc["adapterSeqs"] == [0]  # a directory not named by a number: position 0
    [adapter] = doc["adapters"]
    assert adapter["uri"] == str(merged / "adapter") and adapter["mode"] == "cumulative"
    assert adapter["config"]["peftType"] == "LORA" and adapter["config"]["r"] == 4
    assert adapter["config"]["targetModules"] == ["gate_proj", "q_proj"]
    for entry in adapter["files"]:
        content = (merged / "adapter" / entry["name"]).read_bytes()
        assert entry["sha256"] == hashlib.sha256(content).hexdigest()
    listed = {f["name"]: f for f in doc["files"]}
    on_disk = {p.name for p in out.iterdir()} - {"manifest.json"}
    assert set(listed) == on_disk
    for name, entry in listed.items():
        content = (out / name).read_bytes()
        assert entry["size"] == len(content)
        assert entry["sha256"] == hashlib.sha256(content).hexdigest()
    manifest, digest = read_manifest(str(out))
    assert digest == hashlib.sha256(data).hexdigest()
    assert manifest.version == 7 and manifest.total_bytes == sum(f["size"] for f in doc["files"])


def test_verify_ok(checkpoint: Path) -> None:
    report = verify_checkpoint(str(checkpoint))
    assert report.exists and report.ok, report.message
    assert report.manifest_sha256 == hashlib.sha256((checkpoint / "manifest.json").read_bytes()).hexdigest()
    assert report.file_count == len(list(checkpoint.iterdir())) - 1


def _shard(checkpoint: Path) -> Path:
    return sorted(checkpoint.glob("model-*.safetensors"))[1]


def test_flipped_byte_is_named(checkpoint: Path) -> None:
    shard = _shard(checkpoint)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    report = verify_checkpoint(str(checkpoint))
    assert report.exists and not report.ok
    assert [(p.name, p.reason) for p in report.problems] == [(shard.name, "sha256")]
    assert shard.name in report.message
    # Sizes alone cannot see it.
    assert verify_checkpoint(str(checkpoint), hash_files=False).ok


def test_truncated_and_missing_files_are_named(checkpoint: Path) -> None:
    shard = _shard(checkpoint)
    shard.write_bytes(shard.read_bytes()[:-1])
    (checkpoint / "config.json").unlink()
    report = verify_checkpoint(str(checkpoint), hash_files=False)
    problems = sorted((p.name, p.reason) for p in report.problems)
    assert problems == [("config.json", "missing"), (shard.name, "size")]


def test_no_manifest_means_no_version(checkpoint: Path) -> None:
    (checkpoint / "manifest.json").unlink()
    report = verify_checkpoint(str(checkpoint))
    assert not report.exists and not report.ok and report.message == NO_MANIFEST
    with pytest.raises(ManifestNotFound, match="version does not exist"):
        read_manifest(str(checkpoint))
    empty = checkpoint.parent / "never-written"
    assert not verify_checkpoint(str(empty)).exists


def test_corrupt_manifest(checkpoint: Path) -> None:
    (checkpoint / "manifest.json").write_text('{"formatVersion": 1, "files": "nope"}')
    report = verify_checkpoint(str(checkpoint))
    assert report.exists and not report.ok
    assert report.problems[0].name == "manifest.json" and report.problems[0].reason == "invalid"


def test_cli_verify(checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(checkpoint)]) == 0
    assert "OK" in capsys.readouterr().out
    shard = _shard(checkpoint)
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert main(["verify", str(checkpoint)]) == 1
    err = capsys.readouterr().err
    assert f"bad file {shard.name}: sha256 mismatch" in err
    assert main(["verify", "--json", str(checkpoint)]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["problems"][0]["name"] == shard.name
    (checkpoint / "manifest.json").unlink()
    assert main(["verify", str(checkpoint)]) == 1
    assert NO_MANIFEST in capsys.readouterr().err


def test_clone_checkpoint(merged: Path, tmp_path: Path) -> None:
    from privatefm_merge.errors import MergeError
    from privatefm_merge.seal import clone_checkpoint

    manifest, digest = clone_checkpoint(str(merged / "out"), str(tmp_path / "v8"), version=8, parent_version=7,
                                        base_model="tiny", base_version=3)
    report = verify_checkpoint(str(tmp_path / "v8"))
    assert report.ok and report.manifest_sha256 == digest
    assert manifest.base is not None and manifest.base.uri == str(merged / "out")
    assert manifest.base.manifest_sha256 == hashlib.sha256((merged / "out/manifest.json").read_bytes()).hexdigest()
    assert (manifest.version, manifest.parent_version, manifest.adapters, manifest.adapter_seqs) == (8, 7, None, None)
    with pytest.raises(MergeError, match=r"already has a manifest\.json"):
        clone_checkpoint(str(merged / "out"), str(tmp_path / "v8"))
    with pytest.raises(MergeError, match="source version does not exist"):
        clone_checkpoint(str(tmp_path / "nothing"), str(tmp_path / "v9"))
    with pytest.raises(MergeError, match="base/ prefix"):
        clone_checkpoint(str(merged / "out"), str(tmp_path / "base/x/v2"))
    assert not (tmp_path / "v9").exists() and not (tmp_path / "base").exists()
