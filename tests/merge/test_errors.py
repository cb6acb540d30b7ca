"""Everything the engine refuses, and that it refuses before writing a byte (or, for a
non-finite result found mid-stream, that nothing is committed and nothing is left behind)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from merge_testlib import make_adapter, rewrite_adapter, save_base, tiny_gpt2, tiny_llama
from peft import LoraConfig
from privatefm_merge.contract import Reason
from privatefm_merge.engine import MergeOptions, merge_checkpoint
from privatefm_merge.errors import MergeError
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A tiny fp16 Llama base and a LoRA adapter on q_proj/v_proj/down_proj."""
    root = tmp_path_factory.mktemp("source")
    model = tiny_llama(torch.float16)
    save_base(model, root / "base")
    make_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
                 root / "adapter")
    yield root


@pytest.fixture
def work(tmp_path: Path, source: Path) -> Path:
    shutil.copytree(source / "base", tmp_path / "base")
    shutil.copytree(source / "adapter", tmp_path / "adapter")
    return tmp_path


def _merge(work: Path, output: str | None = None) -> None:
    merge_checkpoint(str(work / "base"), str(work / "adapter"), output or str(work / "out"),
                     MergeOptions(device="cpu"))


def _fails(work: Path, reason: Reason, match: str, output: str | None = None) -> MergeError:
    with pytest.raises(MergeError, match=match) as caught:
        _merge(work, output)
    assert caught.value.reason == reason
    out = Path(output) if output else work / "out"
    assert not out.exists() or not any(out.iterdir()), "nothing may be written"
    return caught.value


def _adapter_tensors(work: Path) -> dict[str, torch.Tensor]:
    return load_file(str(work / "adapter/adapter_model.safetensors"))


@pytest.mark.parametrize(("config", "match"), [
    ({"peft_type": "PROMPT_TUNING"}, "peft_type 'PROMPT_TUNING' is not supported"),
    ({"peft_type": "IA3"}, "only LORA"),
    ({"bias": "all"}, "bias='all' is not supported"),
    ({"bias": "lora_only"}, "bias='lora_only'"),
    ({"lora_bias": True}, "lora_bias=True"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"layer_replication": [[0, 1]]}, "layer_replication"),
    ({"use_bdlora": {"nblocks": 2}}, "use_bdlora"),
    ({"init_lora_weights": "mica"}, "mica"),
    ({"use_some_future_variant": True}, "unknown option use_some_future_variant"),
    ({"r": 0}, "must be positive"),
    ({"lora_alpha": None}, "bad or missing"),
])
def test_unsupported_adapter_config(work: Path, config: dict[str, object], match: str) -> None:
    rewrite_adapter(work / "adapter", config=config)
    _fails(work, Reason.ADAPTER_INVALID, match)


def test_adapter_key_for_a_module_the_base_lacks(work: Path) -> None:
    tensors = _adapter_tensors(work)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors[key.replace("layers.0", "layers.7")] = tensors.pop(key)
    tensors[key.replace("layers.0", "layers.7").replace("lora_A", "lora_B")] = tensors.pop(
        key.replace("lora_A", "lora_B"))
    rewrite_adapter(work / "adapter", tensors=tensors)
    _fails(work, Reason.ADAPTER_INVALID, r"model\.layers\.7\.self_attn\.q_proj maps to no base tensor")


def test_adapter_key_that_is_not_lora(work: Path) -> None:
    tensors = _adapter_tensors(work)
    tensors["base_model.model.lm_head.weight"] = torch.zeros(128, 64)
    rewrite_adapter(work / "adapter", tensors=tensors)
    _fails(work, Reason.ADAPTER_INVALID, "not LoRA A/B/magnitude weights")


def test_embedding_lora_is_refused(work: Path) -> None:
    tensors = _adapter_tensors(work)
    tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(4, 128)
    rewrite_adapter(work / "adapter", tensors=tensors)
    _fails(work, Reason.ADAPTER_INVALID, "embedding layers is not supported")


def test_missing_lora_b(work: Path) -> None:
    tensors = _adapter_tensors(work)
    del tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"]
    rewrite_adapter(work / "adapter", tensors=tensors)
    _fails(work, Reason.ADAPTER_INVALID, "lacks its lora_A or lora_B")


def test_adapter_from_a_differently_shaped_model(work: Path, tmp_path: Path) -> None:
    other = tiny_gpt2(torch.float16)  # wrong architecture entirely
    make_adapter(other, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"]), tmp_path / "gpt2-adapter")
    shutil.rmtree(work / "adapter")
    shutil.copytree(tmp_path / "gpt2-adapter", work / "adapter")
    _fails(work, Reason.ADAPTER_INVALID, "maps to no base tensor")


def test_shape_mismatch(work: Path) -> None:
    tensors = _adapter_tensors(work)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors[key] = torch.zeros(4, 32)  # in_features 32, the base has 64
    rewrite_adapter(work / "adapter", tensors=tensors)
    _fails(work, Reason.SHAPE_MISMATCH,
           r"q_proj: base tensor .* is \[64, 64\] but the adapter needs \[64, 32\]")


def test_rank_disagrees_with_config(work: Path) -> None:
    rewrite_adapter(work / "adapter", config={"r": 8})
    _fails(work, Reason.SHAPE_MISMATCH, "has rank 4 but the config")


def test_fan_in_fan_out_mismatch(work: Path) -> None:
    tensors = _adapter_tensors(work)  # v_proj is [32, 64]: with fan_in_fan_out it should be [64, 32]
    rewrite_adapter(work / "adapter", config={"fan_in_fan_out": True}, tensors=tensors)
    _fails(work, Reason.SHAPE_MISMATCH, "fan_in_fan_out")


def test_dora_flag_without_magnitudes(work: Path) -> None:
    rewrite_adapter(work / "adapter", config={"use_dora": True})
    _fails(work, Reason.ADAPTER_INVALID, "no lora_magnitude_vector")


def test_missing_adapter_weights(work: Path) -> None:
    (work / "adapter/adapter_model.safetensors").unlink()
    _fails(work, Reason.ADAPTER_INVALID, "has no adapter_model.safetensors")


def test_missing_base(work: Path) -> None:
    for path in (work / "base").glob("model*"):
        path.unlink()
    _fails(work, Reason.BASE_INVALID, "neither model.safetensors nor model.safetensors.index.json")


def test_truncated_base_shard(work: Path) -> None:
    shard = sorted((work / "base").glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    _fails(work, Reason.BASE_INVALID, "header describes")


@pytest.mark.parametrize("poison", ["nan", "inf", "fp16-overflow"])
def test_non_finite_result_commits_nothing(work: Path, poison: str) -> None:
    tensors = _adapter_tensors(work)
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"  # in the last shards
    if poison == "nan":
        tensors[key][3, 1] = float("nan")
    elif poison == "inf":
        tensors[key][0, 0] = float("inf")
    else:  # finite in float32, beyond float16's 65504 once cast back
        tensors[key] = torch.full_like(tensors[key], 1e6)
    rewrite_adapter(work / "adapter", tensors=tensors)
    error = _fails(work, Reason.NON_FINITE_RESULT, "down_proj")
    assert "non-finite" in error.message


@pytest.mark.parametrize("relative", ["base/tiny/v2", "store/base/tiny/v1/merged", "x/../base/y"])
def test_refuses_output_under_base(work: Path, relative: str) -> None:
    output = str(work / relative)
    _fails(work, Reason.OUTPUT_FORBIDDEN, "refusing to write under the base/ prefix", output=output)


def test_refuses_output_under_base_via_symlink(work: Path) -> None:
    (work / "store/base/m").mkdir(parents=True)
    (work / "innocent").symlink_to(work / "store/base/m")
    _fails(work, Reason.OUTPUT_FORBIDDEN, "base/", output=str(work / "innocent/v9"))


def test_refuses_output_inside_an_input(work: Path) -> None:
    _fails(work, Reason.OUTPUT_FORBIDDEN, "overlaps input", output=str(work / "adapter/merged"))


def test_committed_output_is_immutable(work: Path) -> None:
    _merge(work)
    manifest = (work / "out/manifest.json").read_bytes()
    rewrite_adapter(work / "adapter", config={"lora_alpha": 3})  # a different merge
    with pytest.raises(MergeError) as caught:
        _merge(work)
    assert caught.value.reason == Reason.OUTPUT_EXISTS
    assert (work / "out/manifest.json").read_bytes() == manifest


def test_identical_rerun_reports_the_existing_commit(work: Path) -> None:
    first = merge_checkpoint(str(work / "base"), str(work / "adapter"), str(work / "out"))
    again = merge_checkpoint(str(work / "base"), str(work / "adapter"), str(work / "out"))
    assert again.already_committed and again.manifest_sha256 == first.manifest_sha256


def test_device_cuda_without_cuda(work: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(MergeError, match="CUDA is not available") as caught:
        merge_checkpoint(str(work / "base"), str(work / "adapter"), str(work / "out"),
                         MergeOptions(device="cuda"))
    assert caught.value.reason == Reason.CONFIG_INVALID


def test_unadapted_weight_formats_are_not_copied(work: Path) -> None:
    (work / "base/pytorch_model.bin").write_bytes(b"unmerged weights")
    (work / "base/tokenizer.json").write_text(json.dumps({"vocab": {}}))
    _merge(work)
    names = {p.name for p in (work / "out").iterdir()}
    assert "pytorch_model.bin" not in names and "tokenizer.json" in names


def test_base_that_does_not_match_its_manifest(work: Path) -> None:
    from privatefm_merge.seal import seal_checkpoint

    seal_checkpoint(str(work / "base"))
    (work / "base/config.json").write_text("{}")
    _fails(work, Reason.BASE_INVALID, r"does not match its manifest: config.json: size mismatch")
