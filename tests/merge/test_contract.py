"""The operator-facing contract: environment, result JSON, layout, and that the operator can
import the torch-free modules."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from privatefm_merge import layout
from privatefm_merge.contract import (
    DEFAULT_RESULT_PATH,
    MAX_RESULT_BYTES,
    AdapterRef,
    MergeJob,
    MergeResult,
    Reason,
    result_path_from_env,
)

ENV = {
    "PRIVATEFM_BASE_URI": "s3://models/base/llama/v3",
    "PRIVATEFM_ADAPTERS": '[{"seq": 12, "uri": "s3://models/learners/abc/adapters/12"}, '
                          '{"seq": 13, "uri": "s3://models/learners/abc/adapters/13"}]',
    "PRIVATEFM_OUTPUT_URI": "s3://models/learners/abc/checkpoints/v5",
    "PRIVATEFM_BASE_MODEL": "llama",
    "PRIVATEFM_BASE_VERSION": "3",
    "PRIVATEFM_PARENT_VERSION": "4",
    "PRIVATEFM_TARGET_VERSION": "5",
}


def test_job_from_env_round_trip() -> None:
    job = MergeJob.from_env(ENV)
    adapters = (AdapterRef(12, "s3://models/learners/abc/adapters/12"),
                AdapterRef(13, "s3://models/learners/abc/adapters/13"))
    assert job == MergeJob("s3://models/base/llama/v3", adapters,
                           "s3://models/learners/abc/checkpoints/v5", "llama", 3, 4, 5, "auto")
    assert MergeJob.from_env(job.to_env()) == job
    first = MergeJob.from_env({**ENV, "PRIVATEFM_PARENT_VERSION": "", "PRIVATEFM_DEVICE": "cuda"})
    assert first.parent_version is None and first.device == "cuda"
    assert first.to_env()["PRIVATEFM_PARENT_VERSION"] == ""
    without = dict(ENV)
    del without["PRIVATEFM_PARENT_VERSION"]
    assert MergeJob.from_env(without).parent_version is None
    assert json.loads(job.to_env()["PRIVATEFM_ADAPTERS"]) == [
        {"seq": 12, "uri": "s3://models/learners/abc/adapters/12"},
        {"seq": 13, "uri": "s3://models/learners/abc/adapters/13"}]
    with pytest.raises(ValueError, match="PRIVATEFM_ADAPTERS must list at least one adapter"):
        job.replace(adapters=())


@pytest.mark.parametrize(("change", "match"), [
    ({"PRIVATEFM_BASE_URI": ""}, "PRIVATEFM_BASE_URI is required"),
    ({"PRIVATEFM_OUTPUT_URI": None}, "PRIVATEFM_OUTPUT_URI is required"),
    ({"PRIVATEFM_TARGET_VERSION": "v5"}, "PRIVATEFM_TARGET_VERSION must be an integer"),
    ({"PRIVATEFM_BASE_VERSION": "-1"}, "PRIVATEFM_BASE_VERSION must be >= 0"),
    ({"PRIVATEFM_PARENT_VERSION": "x"}, "PRIVATEFM_PARENT_VERSION must be an integer"),
    ({"PRIVATEFM_DEVICE": "tpu"}, "PRIVATEFM_DEVICE must be one of auto, cpu, cuda"),
    ({"PRIVATEFM_ADAPTERS": None}, "PRIVATEFM_ADAPTERS is required"),
    ({"PRIVATEFM_ADAPTERS": "[]"}, "PRIVATEFM_ADAPTERS must be a non-empty JSON list"),
    ({"PRIVATEFM_ADAPTERS": "s3://b/learners/x/adapters/1"}, "PRIVATEFM_ADAPTERS is not JSON"),
    ({"PRIVATEFM_ADAPTERS": '{"seq": 1, "uri": "s3://b/a/1"}'}, "PRIVATEFM_ADAPTERS must be a non-empty JSON list"),
    ({"PRIVATEFM_ADAPTERS": '[{"seq": "1", "uri": "s3://b/a/1"}]'}, "PRIVATEFM_ADAPTERS: each entry must be"),
    ({"PRIVATEFM_ADAPTERS": '[{"seq": 1, "uri": ""}]'}, "PRIVATEFM_ADAPTERS: each entry must be"),
    ({"PRIVATEFM_ADAPTERS": '[{"seq": 1, "url": "s3://b/a/1"}]'}, "PRIVATEFM_ADAPTERS: each entry must be"),
    ({"PRIVATEFM_ADAPTERS": '[{"seq": 1, "uri": "s3://b/a/1"}, {"seq": 1, "uri": "s3://b/a/2"}]'},
     "PRIVATEFM_ADAPTERS: sequence numbers repeat"),
])
def test_job_from_env_errors_name_the_variable(change: dict[str, str | None], match: str) -> None:
    env = {k: v for k, v in {**ENV, **change}.items() if v is not None}
    with pytest.raises(ValueError, match=match):
        MergeJob.from_env(env)


def test_result_path() -> None:
    assert result_path_from_env({}) == DEFAULT_RESULT_PATH == "/dev/termination-log"
    assert result_path_from_env({"PRIVATEFM_RESULT_PATH": "/tmp/r.json"}) == "/tmp/r.json"


def test_result_json_is_camel_case_and_round_trips() -> None:
    result = MergeResult(status="Succeeded", version=5, output_uri="s3://b/k", manifest_sha256="ab" * 32,
                         total_bytes=10, file_count=2, duration_seconds=1.5, message="ok")
    doc = json.loads(result.to_json())
    assert set(doc) == {"status", "version", "outputUri", "manifestSha256", "totalBytes", "fileCount",
                        "adapterSeqs", "durationSeconds", "reason", "message"}
    assert MergeResult.from_json(result.to_json()) == result
    folded = result.model_copy(update={"adapter_seqs": [3, 4, 5]})
    assert json.loads(folded.to_json())["adapterSeqs"] == [3, 4, 5]
    assert MergeResult.from_json(folded.to_json()) == folded
    assert result.succeeded


def test_result_json_fits_the_termination_message() -> None:
    long = "é" * 5000 + "\n\"quoted\"" * 500
    result = MergeResult(status="Failed", reason=Reason.INTERNAL_ERROR.value, message=long)
    text = result.to_json()
    assert len(text.encode()) <= MAX_RESULT_BYTES
    parsed = MergeResult.from_json(text)
    assert parsed.reason == "InternalError" and parsed.message.endswith("[truncated]")
    assert parsed.message.startswith("é" * 100)


def test_layout() -> None:
    assert layout.base_prefix("llama-3", 2) == "base/llama-3/v2"
    assert layout.adapter_prefix("u1", 17) == "learners/u1/adapters/17"
    assert layout.checkpoint_prefix("u1", 4) == "learners/u1/checkpoints/v4"
    assert layout.events_prefix("u1") == "learners/u1/events"
    assert layout.learner_prefix("u1") == "learners/u1"
    assert layout.parse_s3_uri("s3://bkt/a/b/") == ("bkt", "a/b")
    assert layout.parse_s3_uri("s3://bkt") == ("bkt", "")
    for bad in ("http://x/y", "s3:///key", "s3://b/a//c", "s3://b/../c"):
        with pytest.raises(ValueError):
            layout.parse_s3_uri(bad)
    with pytest.raises(ValueError):
        layout.base_prefix("../etc", 1)
    with pytest.raises(ValueError):
        layout.checkpoint_prefix("u1", -1)


@pytest.mark.parametrize(("location", "under"), [
    ("s3://b/base/llama/v1", True),
    ("s3://b/base", True),
    ("base/llama/v1/model.safetensors", True),
    ("s3://b/tests/x1/base/llama/v1", True),
    ("/data/store/base/m/v1/out", True),
    ("learners/u/../../base/m", True),
    ("s3://b/learners/u1/checkpoints/v1", False),
    ("s3://b/basement/x", False),
    ("/data/store/learners/u1/checkpoints/v2", False),
    ("s3://b/learners/base-line/v1", False),
])
def test_is_under_base(location: str, under: bool) -> None:
    assert layout.is_under_base(location) is under


def test_operator_modules_do_not_import_torch() -> None:
    code = ("import sys\n"
            "import privatefm_merge.contract, privatefm_merge.layout, privatefm_merge.manifest\n"
            "import privatefm_merge.store, privatefm_merge.verify, privatefm_merge.errors\n"
            "heavy = ('torch', 'safetensors', 'transformers', 'peft', 'numpy')\n"
            "heavy = sorted(m for m in heavy if m in sys.modules)\n"
            "assert not heavy, heavy\n")
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"PYTHONPATH": f"{root / 'merge_image'}:{':'.join(sys.path)}"})
    assert proc.returncode == 0, proc.stderr


def test_job_from_env_names_every_problem_at_once() -> None:
    with pytest.raises(ValueError) as caught:
        MergeJob.from_env({"PRIVATEFM_BASE_URI": "/x", "PRIVATEFM_TARGET_VERSION": "two"})
    message = str(caught.value)
    for name in ("PRIVATEFM_ADAPTERS", "PRIVATEFM_OUTPUT_URI", "PRIVATEFM_BASE_MODEL", "PRIVATEFM_BASE_VERSION",
                 "PRIVATEFM_TARGET_VERSION must be an integer"):
        assert name in message
    assert "PRIVATEFM_BASE_URI" not in message and "PRIVATEFM_PARENT_VERSION" not in message


def test_optional_part_size() -> None:
    from privatefm_merge.contract import part_size_from_env

    assert part_size_from_env({}) is None
    assert part_size_from_env({"PRIVATEFM_PART_SIZE_BYTES": str(8 << 20)}) == 8 << 20
    with pytest.raises(ValueError, match="PRIVATEFM_PART_SIZE_BYTES must be at least"):
        part_size_from_env({"PRIVATEFM_PART_SIZE_BYTES": "1024"})
    with pytest.raises(ValueError, match="PRIVATEFM_PART_SIZE_BYTES must be an integer"):
        part_size_from_env({"PRIVATEFM_PART_SIZE_BYTES": "16MiB"})
