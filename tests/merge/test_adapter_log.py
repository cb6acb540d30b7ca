"""Adapter logs: the fold order (pure), and folding several adapters in one streaming pass.

Tolerances. With one adapter the engine is PEFT-exact (``test_equivalence``). With several, it
keeps the weight in float32 from one adapter to the next and rounds to the base dtype once, at
the end. So:

* against PEFT applying the adapters one after another **in float32**, then casting once to the
  base dtype, a bfloat16 result is within **1 ulp** (only float32 rounding differs: three
  consecutive plain LoRAs are one product of rank 3r in the engine); a float32 result within
  1e-6 x the tensor's largest weight;
* against PEFT (or the engine) applying them one after another **in the base dtype**, rounding
  after every adapter: each rounding moves a value by at most half an ulp *of the value then*,
  which can be far larger than the final value after a later adapter cancels most of it. So
  the bound is absolute, per tensor: max |diff| <= N x 2^-7 x max |W| for N adapters in
  bfloat16 (2^-7 x max |W| is at least one ulp of the tensor's largest value, two half-ulps).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from merge_testlib import LLAMA_LINEAR, randomize_adapter, read_tensors, save_base, tiny_llama, ulp_distance
from peft import LoraConfig, PeftModel, get_peft_model
from privatefm_merge.adapter_log import (
    SIDECAR_NAME,
    AdapterMode,
    check_order,
    default_seqs,
    fold,
    parse_sidecar,
)
from privatefm_merge.engine import MergeOptions, merge_checkpoint
from privatefm_merge.errors import MergeError
from privatefm_merge.verify import verify_checkpoint

CLI = str(Path(sys.executable).parent / "privatefm-merge")
C, INC = AdapterMode.CUMULATIVE, AdapterMode.INCREMENTAL


# ---------------------------------------------------------------------------------------------
# Pure


def test_parse_sidecar() -> None:
    assert parse_sidecar(None) is C
    assert parse_sidecar(b'{"mode": "incremental"}') is INC
    assert parse_sidecar(b'{"mode": "cumulative"}') is C
    assert parse_sidecar(b"{}") is C
    with pytest.raises(ValueError, match=r"privatefm\.json is not JSON"):
        parse_sidecar(b"mode: incremental")
    with pytest.raises(ValueError, match="must be a JSON object"):
        parse_sidecar(b'["incremental"]')
    with pytest.raises(ValueError, match="mode 'delta' is not one of 'cumulative', 'incremental'"):
        parse_sidecar(b'{"mode": "delta"}')


@pytest.mark.parametrize(("log", "expected"), [
    ([], []),
    ([(1, C)], [1]),
    ([(1, C), (2, C), (3, C)], [3]),  # the newest cumulative one replaces the rest
    ([(1, C), (2, INC), (3, INC)], [1, 2, 3]),
    ([(3, INC), (1, C), (2, INC)], [1, 2, 3]),  # any order in, sequence order out
    ([(1, C), (2, INC), (3, C), (4, INC), (5, INC)], [3, 4, 5]),
    ([(1, INC), (2, INC)], [1, 2]),  # no cumulative one: incremental from the base
    ([(1, INC), (2, C)], [2]),
    ([(1, INC), (2, C), (3, INC)], [2, 3]),
])
def test_fold(log: list[tuple[int, AdapterMode]], expected: list[int]) -> None:
    assert fold(log) == expected


def test_fold_refuses_repeated_seqs_and_check_order() -> None:
    with pytest.raises(ValueError, match="repeat"):
        fold([(1, C), (1, INC)])
    check_order([])
    check_order([C, INC, INC])
    check_order([INC, INC])
    with pytest.raises(ValueError, match="adapter 2 is cumulative: it replaces everything before it; pass it first"):
        check_order([C, INC, C])


def test_default_seqs() -> None:
    assert default_seqs(["s3://b/learners/u/adapters/7", "/x/adapters/8/", "/x/my-adapter"]) == [7, 8, 2]


# ---------------------------------------------------------------------------------------------
# Folding with the engine


def _adapter(directory: Path, config: LoraConfig, seed: int, mode: AdapterMode | None) -> Path:
    """An adapter with random weights for the tiny Llama (its weights do not depend on the base)."""
    peft_model = get_peft_model(tiny_llama(torch.float32), config)
    randomize_adapter(peft_model, seed)
    peft_model.save_pretrained(str(directory))
    if mode is not None:
        (directory / SIDECAR_NAME).write_text(json.dumps({"mode": mode.value}))
    return directory


def _peft_sequential(base_dir: Path, adapters: list[Path], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """PEFT: load the base in ``dtype``, then merge_and_unload each adapter in turn."""
    model: Any = tiny_llama(dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in read_tensors(base_dir).items()}, strict=False)
    for adapter in adapters:
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _shards(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.safetensors"))}


LORA = LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_LINEAR)
DORA = LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)


@pytest.mark.parametrize("kinds", [("lora", "lora", "lora"), ("lora", "dora", "dora")])
def test_three_incremental_adapters_in_one_pass(tmp_path: Path, kinds: tuple[str, ...]) -> None:
    base_dir = save_base(tiny_llama(torch.bfloat16, seed=5), tmp_path / "base")
    log = tmp_path / "adapters"
    adapters = [_adapter(log / str(seq), DORA if kind == "dora" else LORA, seed=10 + seq, mode=INC)
                for seq, kind in zip((3, 4, 5), kinds, strict=True)]
    base = read_tensors(base_dir)

    # One pass, twice: the same bytes.
    small = MergeOptions(device="cpu", block_elements=64 * 64, chunk_bytes=1)
    first = merge_checkpoint(str(base_dir), [str(a) for a in adapters], str(tmp_path / "one-pass"), small)
    again = merge_checkpoint(str(base_dir), [str(a) for a in adapters], str(tmp_path / "again"))
    assert _shards(tmp_path / "one-pass") == _shards(tmp_path / "again")
    assert [(f.name, f.sha256) for f in first.manifest.files] == [(f.name, f.sha256) for f in again.manifest.files]
    manifest = json.loads((tmp_path / "one-pass/manifest.json").read_text())
    assert manifest["adapterSeqs"] == [3, 4, 5]  # from the directory names
    assert [a["mode"] for a in manifest["adapters"]] == ["incremental"] * 3
    assert [a["uri"] for a in manifest["adapters"]] == [str(a) for a in adapters]
    assert [a["config"]["useDora"] for a in manifest["adapters"]] == [k == "dora" for k in kinds]
    assert SIDECAR_NAME in {f["name"] for f in manifest["adapters"][0]["files"]}
    assert verify_checkpoint(str(tmp_path / "one-pass")).ok

    # One merge at a time with the engine (each one PEFT-exact, rounding to bf16 in between).
    previous = base_dir
    for number, adapter in enumerate(adapters):
        merge_checkpoint(str(previous), str(adapter), str(tmp_path / f"step{number}"))
        previous = tmp_path / f"step{number}"
    one_pass, stepwise = read_tensors(tmp_path / "one-pass"), read_tensors(previous)

    peft_fp32 = _peft_sequential(base_dir, adapters, torch.float32)
    peft_bf16 = _peft_sequential(base_dir, adapters, torch.bfloat16)
    exact = 0
    for name, tensor in one_pass.items():
        assert tensor.dtype == torch.bfloat16 and tensor.shape == base[name].shape, name
        assert ulp_distance(tensor, peft_fp32[name].to(torch.bfloat16)) <= 1, name
        bound = len(adapters) * 2**-7 * float(stepwise[name].abs().max())
        assert float((tensor.float() - stepwise[name].float()).abs().max()) <= bound, name
        assert torch.equal(stepwise[name], peft_bf16[name]), name  # one merge at a time is PEFT-exact
        exact += torch.equal(tensor, peft_fp32[name].to(torch.bfloat16))
    assert exact >= len(one_pass) - 3, "nearly every tensor is bit-identical to PEFT in float32"
    changed = {n for n in one_pass if not torch.equal(one_pass[n], base[n])}
    assert changed == {n for n in base if any(f".{t}.weight" in n for t in LLAMA_LINEAR)}


def test_fp32_base_matches_peft_in_float32(tmp_path: Path) -> None:
    base_dir = save_base(tiny_llama(torch.float32, seed=6), tmp_path / "base")
    adapters = [_adapter(tmp_path / f"a{n}", config, seed=20 + n, mode=INC if n else None)
                for n, config in enumerate((LORA, DORA, LORA, LORA))]
    merge_checkpoint(str(base_dir), [str(a) for a in adapters], str(tmp_path / "out"),
                     MergeOptions(device="cpu", block_elements=64 * 64, chunk_bytes=1))
    reference = _peft_sequential(base_dir, adapters, torch.float32)
    for name, tensor in read_tensors(tmp_path / "out").items():
        scale = float(reference[name].abs().max())
        assert float((tensor - reference[name]).abs().max()) <= 1e-6 * scale, name
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert manifest["adapterSeqs"] == [0, 1, 2, 3]  # directory names are not numbers: positions
    assert [a["mode"] for a in manifest["adapters"]] == ["cumulative", "incremental", "incremental", "incremental"]


def test_order_and_sidecar_errors(tmp_path: Path) -> None:
    base_dir = save_base(tiny_llama(torch.bfloat16), tmp_path / "base")
    first = _adapter(tmp_path / "1", LORA, seed=1, mode=None)
    second = _adapter(tmp_path / "2", LORA, seed=2, mode=C)
    with pytest.raises(MergeError, match="adapter 1 is cumulative") as caught:
        merge_checkpoint(str(base_dir), [str(first), str(second)], str(tmp_path / "out"))
    assert caught.value.reason == "AdapterInvalid"
    (second / SIDECAR_NAME).write_text('{"mode": "sideways"}')
    with pytest.raises(MergeError, match="mode 'sideways' is not one of") as caught:
        merge_checkpoint(str(base_dir), [str(first), str(second)], str(tmp_path / "out"))
    assert caught.value.reason == "AdapterInvalid"
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_cli_takes_adapter_repeatedly(tmp_path: Path) -> None:
    base_dir = save_base(tiny_llama(torch.bfloat16), tmp_path / "base")
    adapters = [_adapter(tmp_path / "log" / str(seq), LORA, seed=seq, mode=INC if seq > 7 else None)
                for seq in (7, 8, 9)]
    args = [CLI, "merge", "--base", str(base_dir), "--output", str(tmp_path / "out"), "--device", "cpu"]
    for adapter in adapters:
        args += ["--adapter", str(adapter)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["status"] == "Succeeded" and result["adapterSeqs"] == [7, 8, 9]
    merge_checkpoint(str(base_dir), [str(a) for a in adapters], str(tmp_path / "lib"))
    assert _shards(tmp_path / "out") == _shards(tmp_path / "lib")


def test_manifests_from_before_adapter_logs_still_read() -> None:
    """A manifest written with one ``adapter`` object reads as a one-adapter fold."""
    from privatefm_merge.manifest import parse_manifest

    old = {"formatVersion": 1, "tool": {"name": "privatefm-merge", "version": "0.1"},
           "createdAt": "2026-11-01T00:00:00Z", "version": 2, "parentVersion": 1,
           "base": {"uri": "s3://b/base/m/v1"},
           "adapter": {"uri": "s3://b/learners/u/adapters/3", "files": [],
                       "config": {"peftType": "LORA", "r": 8, "loraAlpha": 16}},
           "files": [{"name": "model.safetensors", "size": 4, "sha256": "0" * 64}]}
    manifest = parse_manifest(json.dumps(old).encode())
    assert manifest.adapters is not None and [a.uri for a in manifest.adapters] == ["s3://b/learners/u/adapters/3"]
    assert manifest.adapter_seqs is None and manifest.adapters[0].mode is None
    rewritten = json.loads(manifest.to_bytes())
    assert "adapter" not in rewritten and rewritten["adapters"][0]["uri"] == "s3://b/learners/u/adapters/3"
