"""Checkpoint retention, pure: when it runs (a 5-field cron, UTC) and what it prunes.

``due(cron, last_run, now, created)`` says whether the schedule fired since the last run (or since
the learner was created); ``prune_plan`` says which checkpoint versions go. The I/O is in
``reconcilers/retention.py``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

# ---- cron ------------------------------------------------------------------------------------
_MONTHS = {name: n for n, name in enumerate(
    ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), start=1)}
_DAYS = {name: n for n, name in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))}
_MACROS = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *", "@weekly": "0 0 * * 0",
           "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *"}
SEARCH_DAYS = 366 * 8 + 2  # 29 February can be 8 years away (2096 -> 2104); "31 February" never fires


@dataclass(frozen=True)
class Cron:
    """A parsed 5-field cron expression (minute hour day-of-month month day-of-week)."""

    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday … 6 = Saturday (7 is read as 0)
    days_restricted: bool
    weekdays_restricted: bool

    def day_matches(self, day: datetime) -> bool:
        if day.month not in self.months:
            return False
        dom = day.day in self.days
        dow = (day.isoweekday() % 7) in self.weekdays
        if self.days_restricted and self.weekdays_restricted:  # standard cron: either one will do
            return dom or dow
        return dom and dow

    def matches(self, at: datetime) -> bool:
        return at.minute in self.minutes and at.hour in self.hours and self.day_matches(at)

    def next_after(self, after: datetime, limit_days: int = SEARCH_DAYS) -> datetime | None:
        """The first fire time strictly after ``after`` (at whole minutes), or None within ``limit_days``."""
        start = after.replace(second=0, microsecond=0) + timedelta(minutes=1)
        day = start.replace(hour=0, minute=0)
        for _ in range(limit_days):
            if self.day_matches(day):
                for hour in sorted(self.hours):
                    for minute in sorted(self.minutes):
                        candidate = day.replace(hour=hour, minute=minute)
                        if candidate >= start:
                            return candidate
            day += timedelta(days=1)
        return None


def _value(token: str, names: dict[str, int], what: str) -> int:
    token = token.strip().lower()
    if token in names:
        return names[token]
    if not token.isdigit():
        raise ValueError(f"cron {what}: {token!r} is not a number{' or a name' if names else ''}")
    return int(token)


def _field(text: str, low: int, high: int, names: dict[str, int], what: str) -> frozenset[int]:
    values: set[int] = set()
    for part in text.split(","):
        if not part:
            raise ValueError(f"cron {what}: empty list item in {text!r}")
        rng, _, step_text = part.partition("/")
        step = 1
        if step_text:
            if not step_text.isdigit() or int(step_text) == 0:
                raise ValueError(f"cron {what}: bad step {step_text!r}")
            step = int(step_text)
        if rng == "*":
            first, last = low, high
        elif "-" in rng:
            a, _, b = rng.partition("-")
            first, last = _value(a, names, what), _value(b, names, what)
        else:
            first = _value(rng, names, what)
            last = high if step_text else first  # "5/15" means 5, 20, 35, 50
        if not (low <= first <= high and low <= last <= high) or first > last:
            raise ValueError(f"cron {what}: {part!r} is outside {low}-{high}")
        values.update(range(first, last + 1, step))
    return frozenset(values)


def parse_cron(expression: str) -> Cron:
    """Parses ``minute hour day-of-month month day-of-week`` (with ``*``, lists, ranges, steps,
    month and weekday names, and the @daily-style macros). Raises ValueError on anything else."""
    text = _MACROS.get(expression.strip().lower(), expression)
    fields = text.split()
    if len(fields) != 5:
        raise ValueError(f"cron {expression!r}: expected 5 fields (minute hour day-of-month month day-of-week)")
    minute, hour, dom, month, dow = fields
    weekdays = _field(dow, 0, 7, _DAYS, "day of week")
    return Cron(minutes=_field(minute, 0, 59, {}, "minute"), hours=_field(hour, 0, 23, {}, "hour"),
                days=_field(dom, 1, 31, {}, "day of month"), months=_field(month, 1, 12, _MONTHS, "month"),
                weekdays=frozenset(d % 7 for d in weekdays),
                days_restricted=not dom.startswith("*"), weekdays_restricted=not dow.startswith("*"))


def due(cron: str | Cron, last_run: datetime | None, now: datetime, created: datetime | None) -> bool:
    """Whether the schedule fired in ``(last_run or created, now]``: a missed fire (the operator was
    down) runs once at the next look, never once per missed fire. With neither time known it runs."""
    parsed = parse_cron(cron) if isinstance(cron, str) else cron
    since = last_run or created
    if since is None:
        return True
    if since >= now:
        return False
    fire = parsed.next_after(since)
    return fire is not None and fire <= now


def requested(annotation: str | None, handled: str | None) -> bool:
    """Whether the prune-requested annotation holds a value no run has handled yet."""
    return bool(annotation) and annotation != handled


# ---- what to prune ---------------------------------------------------------------------------
@dataclass(frozen=True)
class StoredVersion:
    """A checkpoint version directory in the store."""

    version: int
    verified: bool  # committed (its manifest exists) and the operator recorded it as verified
    size_bytes: int = 0
    objects: int = 0


def prune_plan(versions: Sequence[StoredVersion], current: int | None, keep: int,
               protected: Iterable[int] = ()) -> list[int]:
    """The versions to delete, oldest first. Kept: the current one, the newest ``keep`` verified
    versions besides it, and every protected one (what a running merge writes or reads, what a
    verify Job reads). Everything else goes, including the leftovers of failed runs (unverified)."""
    guarded = set(protected)
    if current is not None:
        guarded.add(current)
    verified = sorted((v.version for v in versions if v.verified and v.version != current), reverse=True)
    kept = guarded | set(verified[:max(keep, 0)])
    return sorted({v.version for v in versions} - kept)
