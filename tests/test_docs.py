"""Docs that show what the code builds must show what it builds today."""

from __future__ import annotations

import json
import re
from pathlib import Path

from privatefm_operator.store_policy import merge_session_policy, verify_session_policy

REPO = Path(__file__).resolve().parents[1]


def test_the_session_policy_in_the_store_docs_is_the_one_the_operator_builds() -> None:
    text = (REPO / "docs" / "store.md").read_text()
    shown = json.loads(re.search(r"```json\n(\{\n  \"Version\".*?)\n```", text, re.S).group(1))  # type: ignore[union-attr]
    assert shown == merge_session_policy("privatefm", "base/llama-3-8b/v4", "learners/3f1c2a9e04b7/adapters",
                                         "learners/3f1c2a9e04b7/checkpoints/v12")


def test_the_verify_policy_in_the_store_docs_is_the_one_the_operator_builds() -> None:
    text = (REPO / "docs" / "store.md").read_text()
    section = text[text.index("## Deep check"):]
    shown = json.loads(re.search(r"```json\n(\{\n  \"Version\".*?)\n```", section, re.S).group(1))  # type: ignore[union-attr]
    assert shown == verify_session_policy("privatefm", "learners/3f1c2a9e04b7/checkpoints/v12")
