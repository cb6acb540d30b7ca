"""``privatefm-merge pod``: the job comes from the environment, the result goes to the
termination-message path (in both outcomes), progress goes to stderr as JSON lines."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from merge_testlib import make_adapter, rewrite_adapter, save_base, tiny_llama
from peft import LoraConfig
from privatefm_merge.contract import AdapterRef, MergeJob, MergeResult

CLI = str(Path(sys.executable).parent / "privatefm-merge")


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("pod")
    model = tiny_llama(torch.bfloat16)
    save_base(model, root / "base")
    make_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"]), root / "adapter")
    yield root


def run_pod(env: dict[str, str], result_path: Path) -> tuple[int, MergeResult | None, list[dict[str, Any]]]:
    full = {**{k: v for k, v in os.environ.items() if not k.startswith("PRIVATEFM_")}, **env,
            "PRIVATEFM_RESULT_PATH": str(result_path)}
    proc = subprocess.run([CLI, "pod"], env=full, capture_output=True, text=True, timeout=120)
    logs = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    assert len(logs) == len([line for line in proc.stderr.splitlines() if line.strip()]), proc.stderr
    result = MergeResult.from_json(result_path.read_text()) if result_path.exists() else None
    return proc.returncode, result, logs


def test_pod_success(source: Path, tmp_path: Path) -> None:
    job = MergeJob(base_uri=str(source / "base"), adapters=(AdapterRef(4, str(source / "adapter")),),
                   output_uri=str(tmp_path / "v2"), base_model="tiny", base_version=1, parent_version=1,
                   target_version=2, device="cpu")
    code, result, logs = run_pod(job.to_env(), tmp_path / "result.json")
    assert code == 0
    assert result is not None and result.status == "Succeeded" and result.version == 2
    manifest = (tmp_path / "v2/manifest.json").read_bytes()
    assert result.manifest_sha256 == hashlib.sha256(manifest).hexdigest()
    doc = json.loads(manifest)
    assert result.file_count == len(doc["files"]) and result.total_bytes == sum(f["size"] for f in doc["files"])
    assert (doc["version"], doc["parentVersion"], doc["base"]["model"], doc["base"]["version"]) == (2, 1, "tiny", 1)
    assert doc["adapterSeqs"] == result.adapter_seqs == [4]
    events = [entry["msg"] for entry in logs]
    assert events[:2] == ["pod_started", "merge_started"] and events[-1] == "merge_succeeded"
    assert (logs[0]["uid"], logs[0]["gid"], logs[0]["version"]) == (os.getuid(), os.getgid(), 2)
    assert "planned" in events and "shard_written" in events
    assert all(entry["level"] == "info" and entry["ts"].endswith("Z") for entry in logs)
    assert {"plan_seconds", "stream_seconds", "commit_seconds"} <= set(logs[-1])


def test_pod_adapter_failure_is_reported(source: Path, tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (adapter / name).write_bytes((source / "adapter" / name).read_bytes())
    rewrite_adapter(adapter, config={"peft_type": "PROMPT_TUNING"})
    job = MergeJob(base_uri=str(source / "base"), adapters=(AdapterRef(0, str(adapter)),),
                   output_uri=str(tmp_path / "v3"), base_model="tiny", base_version=1, parent_version=None,
                   target_version=3, device="cpu")
    code, result, logs = run_pod(job.to_env(), tmp_path / "result.json")
    assert code == 1
    assert result is not None and result.status == "Failed" and result.reason == "AdapterInvalid"
    assert "PROMPT_TUNING" in result.message
    assert logs[-1]["level"] == "error" and logs[-1]["reason"] == "AdapterInvalid"
    assert not (tmp_path / "v3/manifest.json").exists()


def test_pod_bad_environment_is_reported(tmp_path: Path) -> None:
    code, result, _ = run_pod({"PRIVATEFM_BASE_URI": "/nowhere"}, tmp_path / "result.json")
    assert code == 1
    assert result is not None and result.reason == "ConfigInvalid"
    assert "PRIVATEFM_ADAPTERS" in result.message


def test_merge_command_forms(source: Path, tmp_path: Path) -> None:
    """``privatefm-merge --base …`` and ``privatefm-merge merge --base …`` are the same command."""
    for form, out in ((["merge"], tmp_path / "a"), ([], tmp_path / "b")):
        proc = subprocess.run([CLI, *form, "--base", str(source / "base"), "--adapter", str(source / "adapter"),
                               "--output", str(out), "--device", "cpu"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["status"] == "Succeeded"
    shards = sorted(p.name for p in (tmp_path / "a").glob("*.safetensors"))
    assert shards and all((tmp_path / "a" / s).read_bytes() == (tmp_path / "b" / s).read_bytes() for s in shards)
    proc = subprocess.run([CLI, "--base", str(source / "base"), "--adapter", str(source / "adapter"),
                           "--output", str(tmp_path / "store/base/x")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and json.loads(proc.stdout)["reason"] == "OutputForbidden"
    assert not (tmp_path / "store").exists()
