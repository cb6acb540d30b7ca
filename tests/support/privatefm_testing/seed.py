"""Puts a small, locally built base model and learner adapters into the store.

Nothing comes from a hub: a tiny Llama-shaped model is built from a transformers config with
random weights, and a PEFT LoRA adapter with non-zero weights is trained-by-construction.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from privatefm_merge import layout

BASE_MODEL = "tiny-llama"


def _upload_dir(s3_client: Any, bucket: str, directory: Path, prefix: str) -> None:
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            s3_client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(directory).as_posix()}")


def publish_base(s3_client: Any, bucket: str, model: str = BASE_MODEL, version: int = 1, seed: int = 0) -> str:
    """Writes base/<model>/v<version>/ (sharded safetensors + config + manifest). Returns its URI."""
    import torch
    from privatefm_merge.seal import seal_checkpoint
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed + version)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    base = LlamaForCausalLM(config)
    base.to(torch.bfloat16)  # type: ignore[arg-type]  # transformers wraps .to()
    prefix = layout.base_prefix(model, version)
    with tempfile.TemporaryDirectory() as tmp:
        base.save_pretrained(tmp, max_shard_size="100KB")
        _upload_dir(s3_client, bucket, Path(tmp), prefix)
    uri = layout.s3_uri(bucket, prefix)
    seal_checkpoint(uri, version=version, s3_client=s3_client)
    return uri


def publish_adapter(s3_client: Any, bucket: str, ns_uid: str, seq: int, seed: int = 1,
                    corrupt: bool = False, mode: str | None = None) -> str:
    """Writes learners/<nsUid>/adapters/<seq>/ (PEFT LoRA, r=4 on attention and MLP projections).

    ``corrupt`` writes an adapter whose tensors do not fit the base (a bad upstream upload);
    ``mode`` ("incremental" or "cumulative") writes the ``privatefm.json`` sidecar.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden = 48 if corrupt else 64  # a wrong hidden size makes every LoRA shape mismatch the base
    config = LlamaConfig(hidden_size=hidden, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    prefix = layout.adapter_prefix(ns_uid, seq)
    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp)
        if mode is not None:
            (Path(tmp) / "privatefm.json").write_text(json.dumps({"mode": mode}))
        _upload_dir(s3_client, bucket, Path(tmp), prefix)
    return layout.s3_uri(bucket, prefix)
