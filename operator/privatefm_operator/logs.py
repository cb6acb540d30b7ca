"""Structured JSON logs (the formatter the merge CLI uses too), with quiet client libraries."""

from __future__ import annotations

import logging

from privatefm_merge.jsonlog import JsonFormatter


def configure(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("urllib3", "botocore", "boto3", "kubernetes"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
