"""The engine's merge equals PEFT's ``merge_and_unload`` on tiny models built from a config.

Every case: save a (sharded) base, wrap it with a PEFT LoRA whose weights are all randomized
(PEFT initialises lora_B to zero), save the adapter, merge with the engine, and compare every
output tensor with PEFT's merged model. Tolerances (issue #4): float32 max |diff| <= 1e-6 x the
tensor's max |weight|; float16/bfloat16 within 1 ulp. On this CPU the result is in fact
bit-identical, which is asserted separately so a regression in exactness is visible.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from merge_testlib import (
    GPT2_LINEAR,
    LLAMA_LINEAR,
    make_adapter,
    read_tensors,
    save_base,
    tiny_gpt2,
    tiny_llama,
    ulp_distance,
)
from peft import LoraConfig
from privatefm_merge.engine import MergeOptions, merge_checkpoint
from privatefm_merge.verify import verify_checkpoint
from safetensors.torch import load_file

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


PATTERNS = {  # PEFT semantics: a key matches the end of a module name at a '.' boundary, as a regex
    "llama": {"rank_pattern": {"q_proj": 4, r"layers\.1\.mlp\.down_proj": 2},
              "alpha_pattern": {"k_proj": 5, r"layers\.0\.self_attn\.o_proj": 3}},
    "gpt2": {"rank_pattern": {"c_attn": 4, r"h\.1\.mlp\.c_proj": 2},
             "alpha_pattern": {"c_fc": 5, r"h\.0\.attn\.c_proj": 3}},
}


def _variant(arch: str, name: str) -> dict[str, Any]:
    common: dict[str, Any] = {"target_modules": LLAMA_LINEAR if arch == "llama" else GPT2_LINEAR,
                              "fan_in_fan_out": arch == "gpt2"}
    if name == "lora":  # plain LoRA on several modules, power-of-two scaling (16/8)
        return {**common, "r": 8, "lora_alpha": 16}
    if name == "rslora_patterns":  # alpha/sqrt(r) with per-module ranks and alphas
        return {**common, "r": 8, "lora_alpha": 12, "use_rslora": True, **PATTERNS[arch]}
    if name == "dora":
        return {**common, "r": 4, "lora_alpha": 12, "use_dora": True}
    raise AssertionError(name)


CASES = [
    *[("llama", variant, dtype) for variant in ("lora", "rslora_patterns", "dora") for dtype in DTYPES],
    # GPT-2's Conv1D stores weights [in, out]: every GPT-2 case is a fan_in_fan_out case.
    *[("gpt2", variant, dtype) for variant in ("lora", "rslora_patterns", "dora") for dtype in DTYPES],
]


@pytest.mark.parametrize(("arch", "variant", "dtype_name"), CASES, ids=["-".join(c) for c in CASES])
def test_matches_peft_merge_and_unload(tmp_path: Path, arch: str, variant: str, dtype_name: str) -> None:
    dtype = DTYPES[dtype_name]
    model = tiny_llama(dtype) if arch == "llama" else tiny_gpt2(dtype)
    targets = LLAMA_LINEAR if arch == "llama" else GPT2_LINEAR
    base_dir = save_base(model, tmp_path / "base")
    base = read_tensors(base_dir)
    config = LoraConfig(**_variant(arch, variant))
    peft_model = make_adapter(model, config, tmp_path / "adapter")
    if variant == "rslora_patterns":  # the patterns really produced different ranks
        saved = load_file(str(tmp_path / "adapter/adapter_model.safetensors"))
        assert {t.shape[0] for k, t in saved.items() if k.endswith("lora_A.weight")} == {8, 4, 2}

    # Small blocks and chunks (64 rows), so the row-blocked and chunked paths are exercised on
    # these tiny tensors.
    summary = merge_checkpoint(str(base_dir), str(tmp_path / "adapter"), str(tmp_path / "out"),
                               MergeOptions(device="cpu", block_elements=64 * 64, chunk_bytes=1))
    reference = peft_model.merge_and_unload().state_dict()
    ours = read_tensors(tmp_path / "out")

    assert ours.keys() == base.keys()
    adapted = 0
    exact = 0
    for name, tensor in ours.items():
        expected = reference[name]
        assert tensor.dtype == base[name].dtype == expected.dtype, name
        assert tensor.shape == base[name].shape, name
        if dtype == torch.float32:
            scale = float(expected.abs().max())
            assert float((tensor - expected).abs().max()) <= 1e-6 * scale, name
        else:
            assert ulp_distance(tensor, expected) <= 1, name
        exact += torch.equal(tensor, expected)
        adapted += not torch.equal(tensor, base[name])
    targeted = [n for n in base if any(f".{t}.weight" in n for t in targets)]
    assert adapted == len(targeted) > 0, "every targeted weight changed, nothing else did"
    assert exact == len(ours), "bit-identical to PEFT on this CPU"

    # Same files, same sharding, same index; the manifest lists them all and verifies.
    base_files = sorted(p.name for p in base_dir.iterdir())
    out_files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert out_files == sorted([*base_files, "manifest.json"])
    assert (tmp_path / "out/model.safetensors.index.json").read_bytes() == \
        (base_dir / "model.safetensors.index.json").read_bytes()
    assert (tmp_path / "out/config.json").read_bytes() == (base_dir / "config.json").read_bytes()
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert sorted(f["name"] for f in manifest["files"]) == base_files
    assert manifest["adapters"][0]["config"]["useDora"] == (variant == "dora")
    assert summary.file_count == len(base_files)
    assert verify_checkpoint(str(tmp_path / "out")).ok


def test_single_file_base_and_default_blocks(tmp_path: Path) -> None:
    """An unsharded base (one model.safetensors, no index) with the default block size."""
    model = tiny_llama(torch.bfloat16, seed=3)
    base_dir = save_base(model, tmp_path / "base", max_shard_size=None)
    assert not (base_dir / "model.safetensors.index.json").exists()
    peft_model = make_adapter(model, LoraConfig(r=4, lora_alpha=7, target_modules=["q_proj", "down_proj"]),
                              tmp_path / "adapter")
    merge_checkpoint(str(base_dir), str(tmp_path / "adapter"), str(tmp_path / "out"))
    reference = peft_model.merge_and_unload().state_dict()
    ours = read_tensors(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json", "generation_config.json", "manifest.json", "model.safetensors"]
    for name, tensor in ours.items():
        assert torch.equal(tensor, reference[name]), name


def test_bf16_saved_adapter_matches_peft_loading_it(tmp_path: Path) -> None:
    """Trainers often save adapters in bf16; PEFT loads them into float32 adapter weights."""
    from peft import PeftModel
    from safetensors.torch import load_file, save_file

    model = tiny_llama(torch.bfloat16, seed=4)
    base_dir = save_base(model, tmp_path / "base")
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["v_proj", "up_proj"])
    make_adapter(model, config, tmp_path / "adapter")
    weights = tmp_path / "adapter/adapter_model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(weights)).items()}, str(weights))

    fresh = tiny_llama(torch.bfloat16, seed=4)
    reference = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter")).merge_and_unload().state_dict()
    merge_checkpoint(str(base_dir), str(tmp_path / "adapter"), str(tmp_path / "out"))
    for name, tensor in read_tensors(tmp_path / "out").items():
        assert torch.equal(tensor, reference[name]), name
