"""The pure parts: merge arithmetic, PEFT's pattern matching, key mapping, safetensors headers."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from typing import Any

import pytest
import torch
from peft.utils.other import get_pattern_key
from privatefm_merge.adapter import LoraSettings, group_adapter_keys, lora_scaling, pattern_key, resolve_base_name
from privatefm_merge.errors import MergeError
from privatefm_merge.lora_math import NonFiniteError, Workspace, merge_lora_, merged_copy
from privatefm_merge.safetensors_io import SafetensorsError, parse_header


def _inputs(out: int, inn: int, r: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, inn, generator=gen).to(dtype)
    return weight, torch.randn(r, inn, generator=gen), torch.randn(out, r, generator=gen) * 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scaling", [2.0, 1.7])  # power of two (folded into B) or not
def test_lora_formula(dtype: torch.dtype, scaling: float) -> None:
    weight, a, b = _inputs(300, 70, 8, dtype)
    expected = (weight.float() + (b @ a) * scaling).to(dtype)
    assert torch.equal(merged_copy(weight, a, b, scaling), expected)


def test_dora_formula_and_fan_in_fan_out() -> None:
    weight, a, b = _inputs(130, 50, 4, torch.float32)
    magnitude = torch.rand(130) + 0.5
    merged = weight + (b @ a) * 3.0
    expected = (magnitude / torch.linalg.norm(merged, dim=1)).view(-1, 1) * merged
    assert torch.allclose(merged_copy(weight, a, b, 3.0, magnitude=magnitude), expected, rtol=0, atol=1e-6)
    # fan_in_fan_out: the same merge on a weight stored transposed ([in, out]).
    stored = weight.t().contiguous()
    result = merged_copy(stored, a, b, 3.0, magnitude=magnitude, fan_in_fan_out=True)
    assert torch.allclose(result.t(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_block_size_and_workspace_reuse_do_not_change_bits(fan_in_fan_out: bool) -> None:
    weight, a, b = _inputs(1000, 96, 16, torch.bfloat16)
    if fan_in_fan_out:
        weight = weight.t().contiguous()
    magnitude = torch.rand(1000) + 0.5
    reference = merged_copy(weight, a, b, 1.5, magnitude=magnitude, fan_in_fan_out=fan_in_fan_out,
                            block_elements=10**9)
    workspace = Workspace()
    for block in (64 * 96, 3 * 64 * 96, 100):  # 64-row blocks, 192-row blocks, the 64-row minimum
        result = weight.clone()
        merge_lora_(result, a, b, 1.5, magnitude=magnitude, fan_in_fan_out=fan_in_fan_out,
                    block_elements=block, workspace=workspace)
        assert torch.equal(result, reference), block


def test_non_finite_is_detected_and_located() -> None:
    weight, a, b = _inputs(200, 64, 4, torch.float16)
    b[150, 2] = float("nan")
    with pytest.raises(NonFiniteError, match="row 150"):
        merged_copy(weight, a, b, 2.0, block_elements=64 * 64)
    weight, a, b = _inputs(200, 64, 4, torch.float16)
    with pytest.raises(NonFiniteError):  # finite in float32, overflows float16 when cast back
        merged_copy(weight, a, b * 1e6, 2.0)


def test_scaling() -> None:
    assert lora_scaling(16, 8, use_rslora=False) == 2.0
    assert lora_scaling(16, 8, use_rslora=True) == 16 / math.sqrt(8)
    settings = LoraSettings(r=8, lora_alpha=16, use_rslora=True, rank_pattern={"q_proj": 4},
                            alpha_pattern={r"layers\.1\..*v_proj": 3})
    assert settings.scaling_for("model.layers.0.self_attn.q_proj") == 16 / 2
    assert settings.scaling_for("model.layers.1.self_attn.v_proj") == 3 / math.sqrt(8)
    assert settings.scaling_for("model.layers.0.self_attn.v_proj") == 16 / math.sqrt(8)


@pytest.mark.parametrize("module", [
    "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.10.mlp.down_proj",
    "model.layers.1.mlp.down_proj", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj", "q_proj",
    "model.layers.0.self_attn.xq_proj",
])
def test_pattern_key_matches_peft(module: str) -> None:
    patterns = ["q_proj", r"layers\.1\.mlp\.down_proj", r"h\.0\.attn\.c_proj", "mlp.c_proj", r"layers\.1.*"]
    assert pattern_key(patterns, module) == get_pattern_key(patterns, module)


def test_adapter_key_grouping_and_base_names() -> None:
    names = ["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
             "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
             "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"]
    grouped = group_adapter_keys(names, use_dora=True)
    assert list(grouped) == ["model.layers.0.self_attn.q_proj"]
    assert grouped["model.layers.0.self_attn.q_proj"].magnitude == names[2]
    with pytest.raises(MergeError, match="use_dora is not set"):
        group_adapter_keys(names, use_dora=False)
    with pytest.raises(MergeError, match="not LoRA"):
        group_adapter_keys(["model.layers.0.q_proj.lora_A.weight"], use_dora=False)
    base = {"model.layers.0.self_attn.q_proj.weight": 1, "h.0.attn.c_attn.weight": 1}
    assert resolve_base_name("model.layers.0.self_attn.q_proj", base) == "model.layers.0.self_attn.q_proj.weight"
    assert resolve_base_name("transformer.h.0.attn.c_attn", base) == "h.0.attn.c_attn.weight"
    assert resolve_base_name("model.layers.1.self_attn.q_proj", base) is None


def _header(doc: Mapping[str, Any]) -> tuple[bytes, bytes]:
    body = json.dumps(doc).encode()
    return struct.pack("<Q", len(body)), body


def test_safetensors_header_checks() -> None:
    ok = {"b": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [8, 20]},
          "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "__metadata__": {"format": "pt"}}
    header = parse_header(*_header(ok))
    assert list(header.tensors) == ["a", "b"] and header.data_size == 20 and header.metadata == {"format": "pt"}
    bad_size = {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}
    with pytest.raises(SafetensorsError, match="do not match"):
        parse_header(*_header(bad_size))
    overlap = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
               "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    with pytest.raises(SafetensorsError, match="overlaps"):
        parse_header(*_header(overlap))
    with pytest.raises(SafetensorsError, match="unknown dtype"):
        parse_header(*_header({"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}))
