"""A learner's adapter log: which adapters a merge folds, in which order. Pure and torch-free.

A learner's adapters live under ``learners/<nsUid>/adapters/<seq>/``. Each one is either

* **cumulative** (trained against the base model): the newest one replaces all earlier ones.
  This is the default, and what an adapter directory without a sidecar is;
* **incremental** (a delta trained on top of the model the adapters before it produced).

The mode is declared in a small sidecar next to the PEFT files, ``privatefm.json``::

    {"mode": "incremental"}

A checkpoint is then a pure function of (base version, adapter log): the merge folds, in one
streaming pass, the newest cumulative adapter and then every incremental adapter after it, in
sequence order (:func:`fold`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from enum import StrEnum

SIDECAR_NAME = "privatefm.json"


class AdapterMode(StrEnum):
    CUMULATIVE = "cumulative"
    INCREMENTAL = "incremental"


def parse_sidecar(data: bytes | None) -> AdapterMode:
    """The mode a sidecar declares; ``None`` (no sidecar) is cumulative. Raises ``ValueError``."""
    if data is None:
        return AdapterMode.CUMULATIVE
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{SIDECAR_NAME} is not JSON: {err}") from None
    if not isinstance(document, dict):
        raise ValueError(f"{SIDECAR_NAME} must be a JSON object like {{\"mode\": \"incremental\"}}")
    mode = document.get("mode", AdapterMode.CUMULATIVE.value)
    try:
        return AdapterMode(mode)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in AdapterMode)
        raise ValueError(f"{SIDECAR_NAME}: mode {mode!r} is not one of {allowed}") from None


def fold(log: Sequence[tuple[int, AdapterMode]]) -> list[int]:
    """The sequence numbers a merge folds, in order, given the log's (seq, mode) pairs (any order).

    The newest cumulative adapter, then every incremental one after it. Without a cumulative
    one, every incremental one from the start: they were trained on top of the base itself.
    """
    ordered = sorted(log)
    seqs = [seq for seq, _ in ordered]
    if len(set(seqs)) != len(seqs):
        raise ValueError(f"adapter sequence numbers repeat: {seqs}")
    cumulative = [i for i, (_, mode) in enumerate(ordered) if mode == AdapterMode.CUMULATIVE]
    start = cumulative[-1] if cumulative else 0
    return seqs[start:]


def check_order(modes: Sequence[AdapterMode]) -> None:
    """A fold list may start with a cumulative adapter; every later one must be incremental."""
    for position, mode in enumerate(modes):
        if position > 0 and mode == AdapterMode.CUMULATIVE:
            raise ValueError(f"adapter {position} is cumulative: it replaces everything before it; pass it first")


def default_seqs(uris: Sequence[str]) -> list[int]:
    """Sequence numbers for adapters given by location only (the CLI): an adapter directory named
    by an integer (``…/adapters/7``) is that entry of the log; any other is its 0-based position."""
    seqs = []
    for position, uri in enumerate(uris):
        name = uri.rstrip("/").rsplit("/", 1)[-1]
        seqs.append(int(name) if name.isdigit() else position)
    return seqs
