"""Structured logs for the operator and the merge CLI: one JSON object per line, one key set.

Keys: ``ts`` (RFC 3339, UTC, milliseconds), ``level``, ``logger``, ``msg``, the record's ``fields`` (passed as
``extra={"fields": {...}}``), ``object`` (kind/namespace/name when kopf attached its object
context) and ``exc`` (a formatted traceback).
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        ref = getattr(record, "k8s_ref", None)  # set by kopf on its per-object loggers
        if isinstance(ref, dict):
            entry["object"] = {k: ref[k] for k in ("kind", "namespace", "name") if ref.get(k)}
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)
