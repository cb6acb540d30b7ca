"""Retention, pure: the cron schedule and the prune plan, table-tested with no server."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from privatefm_operator import retention
from privatefm_operator.retention import StoredVersion, due, parse_cron, prune_plan


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


# ---- cron ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("expression", "after", "expected"), [
    ("0 4 * * 0", "2024-06-05T12:00", "2024-06-09T04:00"),         # the default: Sundays 04:00
    ("0 4 * * 0", "2024-06-09T04:00", "2024-06-16T04:00"),         # strictly after
    ("0 4 * * 7", "2024-06-05T12:00", "2024-06-09T04:00"),         # 7 is Sunday too
    ("0 4 * * sun", "2024-06-05T12:00", "2024-06-09T04:00"),
    ("* * * * *", "2024-06-05T12:00:30", "2024-06-05T12:01"),
    ("*/15 * * * *", "2024-06-05T12:01", "2024-06-05T12:15"),
    ("5/15 * * * *", "2024-06-05T12:21", "2024-06-05T12:35"),
    ("0 9-17/4 * * *", "2024-06-05T13:00", "2024-06-05T17:00"),
    ("30 1,13 * * *", "2024-06-05T02:00", "2024-06-05T13:30"),
    ("0 0 1 * *", "2024-01-31T00:00", "2024-02-01T00:00"),
    ("0 0 31 * *", "2024-04-01T00:00", "2024-05-31T00:00"),        # skips April (30 days)
    ("0 0 29 2 *", "2024-03-01T00:00", "2028-02-29T00:00"),        # leap days only
    ("0 0 1 jan-mar *", "2024-04-02T00:00", "2025-01-01T00:00"),
    ("0 0 13 * fri", "2024-06-05T00:00", "2024-06-07T00:00"),      # dom OR dow when both are restricted
    ("0 0 13 * fri", "2024-06-08T00:00", "2024-06-13T00:00"),
    ("0 0 * * mon-fri", "2024-06-08T00:00", "2024-06-10T00:00"),   # dow alone: dom is *
    ("0 0 */2 * mon", "2024-06-01T00:00", "2024-06-03T00:00"),     # */2 restricts dom: OR (Monday 3rd)
    ("@daily", "2024-06-05T12:00", "2024-06-06T00:00"),
    ("0 0 31 2 *", "2024-01-01T00:00", None),                      # never
])
def test_next_fire(expression: str, after: str, expected: str | None) -> None:
    fire = parse_cron(expression).next_after(at(after))
    assert fire == (at(expected) if expected else None)


@pytest.mark.parametrize("expression", [
    "", "* * * *", "* * * * * *", "60 * * * *", "* 24 * * *", "* * 0 * *", "* * * 13 *", "* * * * 8",
    "*/0 * * * *", "5-1 * * * *", "a * * * *", "1,,2 * * * *", "* * * foo *",
])
def test_bad_cron_is_refused(expression: str) -> None:
    with pytest.raises(ValueError):
        parse_cron(expression)


@pytest.mark.parametrize(("last_run", "now", "created", "expected"), [
    (None, "2024-06-09T03:59", "2024-06-05T00:00", False),         # never ran, not fired since creation
    (None, "2024-06-09T04:00", "2024-06-05T00:00", True),          # fired at exactly now
    ("2024-06-09T04:00", "2024-06-09T04:30", "2024-06-01T00:00", False),  # already ran for that fire
    ("2024-06-09T03:00", "2024-06-09T04:30", "2024-06-01T00:00", True),
    ("2024-05-01T00:00", "2024-06-09T05:00", "2024-01-01T00:00", True),   # many missed fires: once
    ("2024-06-10T00:00", "2024-06-09T00:00", None, False),         # a clock behind the last run
    (None, "2024-06-09T00:00", None, True),                        # nothing known: run
])
def test_due(last_run: str | None, now: str, created: str | None, expected: bool) -> None:
    assert due("0 4 * * 0", at(last_run) if last_run else None, at(now),
               at(created) if created else None) is expected


def test_due_every_minute() -> None:
    now = at("2024-06-05T12:00:10")
    assert due("* * * * *", now - timedelta(seconds=20), now, None)  # 12:00 fell in between
    assert not due("* * * * *", now - timedelta(seconds=5), now, None)
    assert due(retention.parse_cron("* * * * *"), now - timedelta(minutes=3), now, None)


def test_each_new_value_of_the_prune_request_asks_once() -> None:
    assert not retention.requested(None, None) and not retention.requested("", "t1")
    assert retention.requested("t1", None) and retention.requested("t2", "t1")
    assert not retention.requested("t1", "t1")  # handled


# ---- prune plan ------------------------------------------------------------------------------
def v(version: int, verified: bool = True) -> StoredVersion:
    return StoredVersion(version, verified, size_bytes=100 * version, objects=3)


@pytest.mark.parametrize(("versions", "current", "keep", "protected", "expected"), [
    # 6 verified, current 6, keep 3: 5, 4, 3 stay besides the current.
    ([v(1), v(2), v(3), v(4), v(5), v(6)], 6, 3, (), [1, 2]),
    # the failed runs' leftovers go; they do not count toward keep.
    ([v(1), v(2, False), v(3), v(4, False), v(5), v(6)], 6, 3, (), [2, 4]),
    ([v(1), v(2, False), v(3), v(4, False), v(5), v(6)], 6, 2, (), [1, 2, 4]),
    # the current one stays even when it is old, unverified by record, or keep is small.
    ([v(1), v(2), v(3), v(4)], 1, 1, (), [2, 3]),
    ([v(1, False), v(2), v(3)], 1, 1, (), [2]),
    # protected versions stay: a running merge's target (unverified yet) and its parent, a verify Job's.
    ([v(1), v(2), v(3), v(4), v(5), v(6), v(7, False)], 6, 1, (7, 2), [1, 3, 4]),
    # no current checkpoint: keep the newest verified ones only.
    ([v(1), v(2), v(3, False)], None, 1, (), [1, 3]),
    ([v(1), v(2)], 2, 3, (), []),
    ([], 3, 3, (5,), []),
    # a protected or current version the store does not have is never "pruned".
    ([v(1), v(2)], 9, 1, (8,), [1]),
    # more recent than current (a finished run that lost the race to advance) counts as verified.
    ([v(1), v(2), v(3), v(4)], 3, 1, (), [1, 2]),
])
def test_prune_plan(versions: list[StoredVersion], current: int | None, keep: int, protected: tuple[int, ...],
                    expected: list[int]) -> None:
    assert prune_plan(versions, current, keep, protected) == expected
