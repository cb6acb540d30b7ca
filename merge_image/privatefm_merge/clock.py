"""Wall-clock time in the one form every record of this project uses: UTC, whole seconds, RFC 3339."""

from __future__ import annotations

from datetime import UTC, datetime


def utc_now() -> datetime:
    """Now, in UTC, truncated to whole seconds (what Kubernetes' metav1.Time keeps)."""
    return datetime.now(UTC).replace(microsecond=0)


def rfc3339(at: datetime | None = None) -> str:
    """``2026-11-28T06:18:47Z``: the form of manifests, Events and status timestamps."""
    return (at or utc_now()).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
