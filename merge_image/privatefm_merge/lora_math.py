"""The merge arithmetic, matching PEFT's ``merge_and_unload`` (no I/O).

For a base weight ``W`` (``[out, in]``, or ``[in, out]`` with ``fan_in_fan_out``) and adapter
``A`` (``[r, in]``), ``B`` (``[out, r]``), PEFT computes, with the adapter in float32 (PEFT
autocasts adapter weights of a float16/bfloat16 model to float32):

* LoRA / rsLoRA:  ``W' = cast(W + (B @ A) * s)``, ``s = alpha / r`` (rsLoRA: ``alpha / sqrt(r)``)
* DoRA:           ``M = W + (B @ A) * s`` in float32; ``n = ||M||`` per output row;
                  ``W' = cast((m / n) * M)`` with ``m`` the magnitude vector
* several adapters (an adapter log): each of the above in order, on the float32 result of the
  ones before, and ``cast`` once at the end (:func:`merge_loras_`)

``cast`` rounds to the base dtype (round to nearest even), as PEFT's in-place update does.
The work is done in blocks of output rows, so the float32 working set stays small whatever the
tensor size; DoRA's row norms need whole rows, which a block of rows always has. On this
project's reference CPU (PyTorch with MKL) the result is bit-identical to PEFT's; elsewhere
(another BLAS, CUDA) it can differ in the last bit of float32 intermediates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

TORCH_DTYPES = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}
DEFAULT_BLOCK_ELEMENTS = 1024 * 1024  # float32 elements per block on the CPU (4 MiB: in cache)
ROW_ALIGN = 64


class NonFiniteError(ValueError):
    """The merged weight has a NaN or an infinity."""


def resolve_device(requested: str) -> torch.device:
    """``auto`` picks CUDA when available; ``cuda`` fails clearly when it is not."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available")
    if requested not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {requested!r}")
    return torch.device(requested)


def tensor_view(buffer: bytearray | memoryview, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor over ``buffer`` (no copy; writes go to the buffer)."""
    return torch.frombuffer(buffer, dtype=TORCH_DTYPES[dtype]).reshape(shape)


def _is_power_of_two(value: float) -> bool:
    return value > 0 and math.frexp(value)[0] == 0.5


class Workspace:
    """Reusable float32 scratch tensors (grow-only). Reusing them avoids fresh allocations, whose
    page faults and zero-filling cost more than the arithmetic on a CPU."""

    def __init__(self) -> None:
        self._tensors: dict[tuple[str, torch.device], torch.Tensor] = {}

    def get(self, name: str, rows: int, cols: int, device: torch.device) -> torch.Tensor:
        key = (name, device)
        have = self._tensors.get(key)
        if have is None or have.numel() < rows * cols:
            have = self._tensors[key] = torch.empty(rows * cols, dtype=torch.float32, device=device)
        return have[: rows * cols].view(rows, cols)


@dataclass(frozen=True)
class LoraDelta:
    """One adapter's update of one weight: ``s·B·A``, DoRA-rescaled when ``magnitude`` is set."""

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scaling: float
    magnitude: torch.Tensor | None = None


@dataclass(frozen=True)
class _Step:
    """One matrix product of the fold, in float32 on the device. ``prescaled``: ``b`` already
    carries the scaling (so the step is one ``addmm``)."""

    a: torch.Tensor
    b: torch.Tensor
    scaling: float
    prescaled: bool
    magnitude: torch.Tensor | None


def _steps(deltas: Sequence[LoraDelta], device: torch.device) -> list[_Step]:
    """The deltas as products. Consecutive plain-LoRA deltas become one product of rank
    ``sum(r)``: ``[s1·B1 | s2·B2] @ [A1; A2]`` is their sum in one BLAS call, far cheaper than one
    thin product each. A DoRA delta needs the weight the deltas before it produced, so it ends a
    group."""

    def f32(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=torch.float32)

    steps: list[_Step] = []
    group: list[LoraDelta] = []

    def flush() -> None:
        if len(group) == 1:
            # Alone, a delta keeps PEFT's exact arithmetic: scaling by a power of two is exact, so
            # folding it into B gives bit-identical results to PEFT's (B @ A) * s; other scalings
            # are applied as PEFT does, after the product.
            d = group[0]
            exact = _is_power_of_two(d.scaling)
            steps.append(_Step(f32(d.lora_a), f32(d.lora_b) * d.scaling if exact else f32(d.lora_b),
                               d.scaling, exact, None))
        elif group:
            steps.append(_Step(torch.cat([f32(d.lora_a) for d in group], dim=0),
                               torch.cat([f32(d.lora_b) * d.scaling for d in group], dim=1), 1.0, True, None))
        group.clear()

    for delta in deltas:
        if delta.magnitude is None:
            group.append(delta)
            continue
        flush()
        exact = _is_power_of_two(delta.scaling)
        steps.append(_Step(f32(delta.lora_a), f32(delta.lora_b) * delta.scaling if exact else f32(delta.lora_b),
                           delta.scaling, exact, f32(delta.magnitude)))
    flush()
    return steps


class Fold:
    """Several adapters' deltas for one weight, prepared once (float32, on the device), then
    applied to the whole weight or to blocks of its rows (:meth:`apply_`).

    The weight stays in float32 from one delta to the next and is rounded to its dtype once, at
    the end; each DoRA delta normalises the float32 weight the deltas before it produced. With
    one delta this is exactly PEFT's ``merge_and_unload``; with several it equals PEFT applying
    them one after another in float32 and casting once (up to float32 rounding), and differs
    from PEFT rounding to the base dtype after every adapter by about one unit in the last place
    per adapter at most.
    """

    def __init__(self, deltas: Sequence[LoraDelta], device: torch.device | None = None) -> None:
        self.device = device or torch.device("cpu")
        self.steps = _steps(deltas, self.device)

    def apply_(self, rows: torch.Tensor, *, first_row: int = 0, fan_in_fan_out: bool = False,
               block_elements: int = DEFAULT_BLOCK_ELEMENTS, workspace: Workspace | None = None) -> None:
        """Fold into ``rows`` in place: output rows ``first_row …`` of the weight (all of them by
        default), a float16/bfloat16/float32 CPU tensor, ``[rows, in]`` (or ``[in, rows]`` with
        ``fan_in_fan_out``). ``first_row`` must be a multiple of 64 for PEFT-exact results.
        Raises ``NonFiniteError`` if a merged value is NaN or infinite (``rows`` is then partly
        merged and must be discarded)."""
        device = self.device
        workspace = workspace or Workspace()
        rows_view = rows.t() if fan_in_fan_out else rows  # [out, in] either way
        out_features, in_features = rows_view.shape
        # Blocks of a multiple of 64 rows: BLAS kernels then compute each row exactly as they do in
        # PEFT's single whole-matrix product (odd-sized row blocks take other code paths whose
        # rounding differs in the last bit).
        rows_per_block = max(ROW_ALIGN, block_elements // max(1, in_features) // ROW_ALIGN * ROW_ALIGN)
        rows_per_block = min(rows_per_block, out_features)
        for start in range(0, out_features, rows_per_block):
            stop = min(out_features, start + rows_per_block)
            first, last = first_row + start, first_row + stop  # in the whole weight: B's rows
            target = rows_view[start:stop]
            if fan_in_fan_out:  # keep the stored [in, out] memory order, as PEFT's transposed view does
                merged = workspace.get("merged", in_features, stop - start, device).t()
            else:
                merged = workspace.get("merged", stop - start, in_features, device)
            merged.copy_(target)  # to float32 (and to the device)
            for step in self.steps:
                if step.prescaled:  # merged += B_s @ A in one BLAS call
                    merged.addmm_(step.b[first:last], step.a)
                else:
                    delta = workspace.get("delta", stop - start, in_features, device)
                    torch.mm(step.b[first:last], step.a, out=delta)
                    delta.mul_(step.scaling)
                    merged.add_(delta)
                if step.magnitude is not None:
                    norm = torch.linalg.norm(merged, dim=1)
                    merged.mul_((step.magnitude[first:last] / norm).view(-1, 1))
            target.copy_(merged)  # rounds to the weight's dtype
            _check_finite(target, first)


def merge_loras_(weight: torch.Tensor, deltas: Sequence[LoraDelta], *, fan_in_fan_out: bool = False,
                 device: torch.device | None = None, block_elements: int = DEFAULT_BLOCK_ELEMENTS,
                 workspace: Workspace | None = None) -> None:
    """Fold several adapters' deltas into ``weight`` in place, in order, in one pass over it
    (see :class:`Fold`)."""
    Fold(deltas, device).apply_(weight, fan_in_fan_out=fan_in_fan_out, block_elements=block_elements,
                                workspace=workspace)


def merge_lora_(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, *,
                fan_in_fan_out: bool = False, magnitude: torch.Tensor | None = None,
                device: torch.device | None = None, block_elements: int = DEFAULT_BLOCK_ELEMENTS,
                workspace: Workspace | None = None) -> None:
    """Merge one LoRA (or DoRA, when ``magnitude`` is given) into ``weight`` in place: PEFT's
    ``merge_and_unload``. See :func:`merge_loras_`."""
    merge_loras_(weight, [LoraDelta(lora_a, lora_b, scaling, magnitude)], fan_in_fan_out=fan_in_fan_out,
                 device=device, block_elements=block_elements, workspace=workspace)


def _check_finite(block: torch.Tensor, first_row: int) -> None:
    # A NaN or an infinity anywhere makes the sum non-finite; the sum is far cheaper than
    # isfinite().all(), and only a (rare) non-finite sum needs the exact check. bfloat16 and
    # float32 sum natively (float32 accumulators, about 3x faster than asking for a float32
    # result); a float16 sum could overflow float16's small range, so it is taken in float32.
    total = block.sum(dtype=torch.float32) if block.dtype == torch.float16 else block.sum()
    if bool(torch.isfinite(total)):
        return
    bad_rows = (~torch.isfinite(block)).any(dim=1).nonzero()
    if len(bad_rows):
        raise NonFiniteError(f"non-finite value in merged output row {first_row + int(bad_rows[0, 0])}")


def merged_copy(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, *,
                fan_in_fan_out: bool = False, magnitude: torch.Tensor | None = None,
                block_elements: int = DEFAULT_BLOCK_ELEMENTS) -> torch.Tensor:
    """Out-of-place ``merge_lora_`` (for tests and callers that keep the base)."""
    result = weight.clone()
    merge_lora_(result, lora_a, lora_b, scaling, fan_in_fan_out=fan_in_fan_out, magnitude=magnitude,
                block_elements=block_elements)
    return result
