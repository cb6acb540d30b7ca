"""Streaming LoRA merge engine for privatefm.

The torch-free modules (``contract``, ``layout``, ``manifest``, ``store``, ``verify``) are imported
by the operator, whose image has no torch. Only ``engine``, ``lora_math`` and ``cli``'s merge path
import torch, and they do so lazily.
"""

from __future__ import annotations

from importlib import metadata

TOOL_NAME = "privatefm-merge"


def tool_version() -> str:
    try:
        return metadata.version("privatefm")
    except metadata.PackageNotFoundError:
        return "0.0.0+unknown"
