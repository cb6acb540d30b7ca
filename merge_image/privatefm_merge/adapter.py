"""PEFT LoRA adapters: config validation, key grouping, and the per-tensor merge plan.

Pure (no torch, no I/O): everything here works on parsed JSON and safetensors headers, so an
unsupported or mismatched adapter is refused before a byte of output is written.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from privatefm_merge.contract import Reason
from privatefm_merge.errors import MergeError
from privatefm_merge.safetensors_io import TensorInfo

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
SUFFIX_A = ".lora_A.weight"
SUFFIX_B = ".lora_B.weight"
SUFFIX_MAGNITUDE = ".lora_magnitude_vector"
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
MERGEABLE_BASE_DTYPES = ("F16", "BF16", "F32")

# Config fields that must keep their default (falsy) value: each one adds parameters or a
# LoRA variant whose merge differs from W + s·B·A (or DoRA's rescaling of it).
_MUST_BE_UNSET = (
    "modules_to_save", "trainable_token_indices", "layer_replication", "lora_bias", "target_parameters",
    "megatron_config", "use_qalora", "alora_invocation_tokens", "velora_config", "monteclora_config",
    "use_bdlora", "arrow_config", "kasa_config",
)
# Known fields that are fine whatever their value (they only matter for training or module choice).
_HARMLESS_TRUTHY = ("use_rslora", "use_dora", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
                    "runtime_config")


def adapter_invalid(message: str) -> MergeError:
    return MergeError(Reason.ADAPTER_INVALID, message)


def shape_mismatch(message: str) -> MergeError:
    return MergeError(Reason.SHAPE_MISMATCH, message)


@dataclass(frozen=True)
class LoraSettings:
    """What the merge needs from ``adapter_config.json``."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    use_dora: bool = False
    fan_in_fan_out: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def rank_for(self, module: str) -> int:
        return int(self.rank_pattern.get(pattern_key(self.rank_pattern, module), self.r))

    def alpha_for(self, module: str) -> float:
        return float(self.alpha_pattern.get(pattern_key(self.alpha_pattern, module), self.lora_alpha))

    def scaling_for(self, module: str) -> float:
        return lora_scaling(self.alpha_for(module), self.rank_for(module), self.use_rslora)


def lora_scaling(alpha: float, r: int, use_rslora: bool) -> float:
    """PEFT's scaling: ``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def pattern_key(pattern_keys: Sequence[str] | Mapping[str, Any], module: str) -> str:
    """PEFT's ``get_pattern_key``: the first pattern that matches the end of the module name
    at a '.' boundary (patterns are regular expressions); else the module name itself."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return module


def parse_adapter_config(data: bytes) -> tuple[LoraSettings, dict[str, Any]]:
    """Validate ``adapter_config.json``; returns the settings and the raw document."""
    try:
        config = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise adapter_invalid(f"{ADAPTER_CONFIG_NAME} is not JSON: {err}") from None
    if not isinstance(config, dict):
        raise adapter_invalid(f"{ADAPTER_CONFIG_NAME} is not a JSON object")
    peft_type = str(config.get("peft_type", ""))
    if peft_type.upper() != "LORA":
        shown = repr(peft_type) if peft_type else "(missing)"
        raise adapter_invalid(f"peft_type {shown} is not supported: only LORA adapters merge")
    if config.get("bias", "none") != "none":
        raise adapter_invalid(f"bias={config['bias']!r} is not supported: only bias='none'")
    for key in _MUST_BE_UNSET:
        if config.get(key):
            raise adapter_invalid(f"{key}={config[key]!r} is not supported")
    if config.get("init_lora_weights") == "mica":
        raise adapter_invalid("init_lora_weights='mica' (a LoRA variant) is not supported")
    for key, value in config.items():  # future variants are likely spelled like these
        if value and key not in _HARMLESS_TRUTHY and (key.startswith("use_") or key.endswith("_config")):
            raise adapter_invalid(f"unknown option {key}={value!r} is not supported")
    try:
        settings = LoraSettings(
            r=int(config["r"]),
            lora_alpha=float(config["lora_alpha"]),
            use_rslora=bool(config.get("use_rslora", False)),
            use_dora=bool(config.get("use_dora", False)),
            fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
            rank_pattern={str(k): int(v) for k, v in (config.get("rank_pattern") or {}).items()},
            alpha_pattern={str(k): float(v) for k, v in (config.get("alpha_pattern") or {}).items()},
        )
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise adapter_invalid(f"{ADAPTER_CONFIG_NAME}: bad or missing r/lora_alpha/patterns: {err}") from None
    if settings.r <= 0 or any(v <= 0 for v in settings.rank_pattern.values()):
        raise adapter_invalid("r and rank_pattern values must be positive")
    for pattern in [*settings.rank_pattern, *settings.alpha_pattern]:
        try:
            re.compile(pattern)
        except re.error as err:
            raise adapter_invalid(f"rank/alpha pattern {pattern!r} is not a valid regex: {err}") from None
    return settings, config


@dataclass(frozen=True)
class ModuleKeys:
    """The adapter tensors of one adapted module."""

    module: str  # the module's name in the model, e.g. model.layers.0.self_attn.q_proj
    lora_a: str
    lora_b: str
    magnitude: str | None = None


def group_adapter_keys(names: Sequence[str], use_dora: bool) -> dict[str, ModuleKeys]:
    """Group PEFT's saved keys (``base_model.model.<module>.lora_A.weight`` …) by module."""
    parts: dict[str, dict[str, str]] = {}
    unknown = []
    for name in names:
        for suffix, role in ((SUFFIX_A, "a"), (SUFFIX_B, "b"), (SUFFIX_MAGNITUDE, "m")):
            if name.startswith(PEFT_PREFIX) and name.endswith(suffix):
                module = name[len(PEFT_PREFIX): -len(suffix)]
                if module:
                    parts.setdefault(module, {})[role] = name
                    break
        else:
            unknown.append(name)
    if unknown:
        hint = ""
        if any("lora_embedding_" in n for n in unknown):
            hint = " (LoRA on embedding layers is not supported)"
        elif any(n.endswith(".bias") for n in unknown):
            hint = " (LoRA biases are not supported)"
        shown = ", ".join(sorted(unknown)[:5]) + (" …" if len(unknown) > 5 else "")
        raise adapter_invalid(
            f"{len(unknown)} adapter tensors are not LoRA A/B/magnitude weights{hint}: {shown}")
    grouped = {}
    for module, roles in sorted(parts.items()):
        if "a" not in roles or "b" not in roles:
            raise adapter_invalid(f"module {module} lacks its lora_A or lora_B weight")
        if use_dora and "m" not in roles:
            raise adapter_invalid(f"use_dora is set but module {module} has no lora_magnitude_vector")
        if not use_dora and "m" in roles:
            raise adapter_invalid(f"module {module} has a lora_magnitude_vector but use_dora is not set")
        grouped[module] = ModuleKeys(module, roles["a"], roles["b"], roles.get("m"))
    if not grouped:
        raise adapter_invalid("the adapter has no LoRA weights")
    return grouped


def resolve_base_name(module: str, base_names: Mapping[str, Any]) -> str | None:
    """The base checkpoint tensor a module's LoRA applies to: ``<module>.weight``; or, for
    checkpoints saved without the task wrapper's prefix (GPT-2's ``h.0…`` rather than
    ``transformer.h.0…``), the same name without its first component."""
    exact = f"{module}.weight"
    if exact in base_names:
        return exact
    _, _, rest = module.partition(".")
    if rest and f"{rest}.weight" in base_names:
        return f"{rest}.weight"
    return None


@dataclass(frozen=True)
class TensorPlan:
    """How to merge one base tensor."""

    base_name: str
    module: str
    lora_a: str
    lora_b: str
    magnitude: str | None
    rank: int
    scaling: float
    fan_in_fan_out: bool


def plan_merge(settings: LoraSettings, adapter: Mapping[str, TensorInfo],
               base: Mapping[str, TensorInfo]) -> dict[str, TensorPlan]:
    """Map every adapted module onto its base tensor and check names, dtypes and shapes.

    Returns base tensor name -> plan. Raises ``MergeError`` (AdapterInvalid or ShapeMismatch).
    """
    plans: dict[str, TensorPlan] = {}
    for module, keys in group_adapter_keys(list(adapter), settings.use_dora).items():
        base_name = resolve_base_name(module, base)
        if base_name is None:
            raise adapter_invalid(
                f"adapter module {module} maps to no base tensor ({module}.weight is not in the base)")
        if base_name in plans:
            raise adapter_invalid(f"two adapter modules map to base tensor {base_name}")
        weight = base[base_name]
        a, b = adapter[keys.lora_a], adapter[keys.lora_b]
        for info in (a, b, *([adapter[keys.magnitude]] if keys.magnitude else [])):
            if info.dtype not in FLOAT_DTYPES:
                raise adapter_invalid(
                    f"adapter tensor {info.name} has dtype {info.dtype}, expected a float type")
        if weight.dtype not in MERGEABLE_BASE_DTYPES:
            raise shape_mismatch(
                f"base tensor {base_name} has dtype {weight.dtype}; can merge only F32/F16/BF16")
        if len(weight.shape) != 2 or len(a.shape) != 2 or len(b.shape) != 2:
            raise shape_mismatch(f"{module}: only 2-D (linear) weights are supported; base {weight.shape}, "
                                 f"lora_A {a.shape}, lora_B {b.shape}")
        rank, in_features = a.shape
        out_features, rank_b = b.shape
        if rank_b != rank:
            raise shape_mismatch(f"{module}: lora_A is {a.shape} but lora_B is {b.shape} (ranks differ)")
        expected_rank = settings.rank_for(module)
        if rank != expected_rank:
            raise shape_mismatch(f"{module}: lora_A has rank {rank} but the config (r/rank_pattern) says "
                                 f"{expected_rank}")
        expected = (in_features, out_features) if settings.fan_in_fan_out else (out_features, in_features)
        if weight.shape != expected:
            layout = "[in, out] (fan_in_fan_out)" if settings.fan_in_fan_out else "[out, in]"
            raise shape_mismatch(f"{module}: base tensor {base_name} is {list(weight.shape)} but the adapter "
                                 f"needs {list(expected)} as {layout}")
        if keys.magnitude is not None and adapter[keys.magnitude].shape != (out_features,):
            raise shape_mismatch(f"{module}: lora_magnitude_vector is {list(adapter[keys.magnitude].shape)}, "
                                 f"expected [{out_features}]")
        plans[base_name] = TensorPlan(base_name, module, keys.lora_a, keys.lora_b, keys.magnitude, rank,
                                      settings.scaling_for(module), settings.fan_in_fan_out)
    return plans
