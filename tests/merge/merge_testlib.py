"""Builders for the merge tests: tiny models made locally from a config, PEFT adapters with
non-zero weights, and comparisons (never loads anything from a hub)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_LINEAR = ["c_attn", "c_proj", "c_fc"]


def tiny_llama(dtype: torch.dtype = torch.float32, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    model: Any = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def tiny_gpt2(dtype: torch.dtype = torch.float32, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    model: Any = GPT2LMHeadModel(config)
    return model.to(dtype).eval()


def save_base(model: Any, directory: Path, max_shard_size: str | None = "40KB") -> Path:
    """save_pretrained, sharded (with an index) unless ``max_shard_size`` is None."""
    model.save_pretrained(directory, max_shard_size=max_shard_size or "10GB")
    return directory


def randomize_adapter(peft_model: nn.Module, seed: int = 1) -> None:
    """PEFT initialises lora_B to zero (a no-op adapter); make every adapter weight matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
            elif ".lora_A." in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + 0.2 * torch.randn(param.shape, generator=gen))


def make_adapter(model: nn.Module, config: LoraConfig, directory: Path, seed: int = 1) -> PeftModel:
    """Wrap ``model`` (in place) with a randomized LoRA, save the adapter, return the PeftModel."""
    peft_model = get_peft_model(model, config)
    assert isinstance(peft_model, PeftModel)
    randomize_adapter(peft_model, seed)
    peft_model.save_pretrained(str(directory))
    return peft_model


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                tensors[key] = handle.get_tensor(key)
    return tensors


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> int:
    """Max distance in units in the last place between two same-dtype float tensors."""
    assert a.dtype == b.dtype and a.shape == b.shape
    bits = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}[a.dtype]

    def ordered(t: torch.Tensor) -> torch.Tensor:  # map float bit patterns onto a monotonic integer line
        i = t.contiguous().view(bits).to(torch.int64)
        sign_bit = 1 << (torch.iinfo(bits).bits - 1)
        return torch.where(i < 0, -(i + sign_bit), i)

    return int((ordered(a) - ordered(b)).abs().max()) if a.numel() else 0


def rewrite_adapter(directory: Path, *, config: dict[str, Any] | None = None,
                    tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Replace an adapter's config (merged into the existing one) and/or its tensors."""
    if config is not None:
        path = directory / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    if tensors is not None:
        contiguous = {k: v.contiguous() for k, v in tensors.items()}
        save_file(contiguous, str(directory / "adapter_model.safetensors"))
