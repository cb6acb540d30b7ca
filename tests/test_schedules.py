"""Hashed merge schedules and the default window (pure: no server). The cluster tests check that the
CRD admits the same H forms (tests/test_api.py) and that CronJob accepts what they resolve to."""

from __future__ import annotations

import re
from collections import Counter

import pytest
from privatefm_operator.api import CRON_5_FIELDS
from privatefm_operator.schedules import Window, effective, resolve_hashed

LEARNERS = [f"learner-{i}" for i in range(10_000)]
CRON_NUMBER_ITEM = re.compile(r"^(\d+)(-(\d+))?(/(\d+))?$")


def expand(field: str, low: int, high: int) -> set[int]:
    """The values a resolved (numeric) cron field selects, as CronJob's parser reads them."""
    values: set[int] = set()
    for item in field.split(","):
        match = CRON_NUMBER_ITEM.match(item)
        assert match, f"not a numeric cron item: {item!r}"
        start = int(match[1])
        end = int(match[3]) if match[3] else (high if match[5] else start)
        values.update(range(start, end + 1, int(match[5] or 1)))
    assert all(low <= v <= high for v in values), field
    return values


def test_hashed_fields_are_stable_per_learner_and_differ_between_learners() -> None:
    assert resolve_hashed("H 2 * * *", "ada") == resolve_hashed("H 2 * * *", "ada")
    minutes = Counter(int(resolve_hashed("H 2 * * *", lid).split()[0]) for lid in LEARNERS)
    assert set(minutes) == set(range(60))  # every minute is someone's
    # Uniform: 10,000 learners over 60 minutes is 167 each; a fair hash stays well within ±30%.
    assert min(minutes.values()) > 117 and max(minutes.values()) < 217, minutes


def test_minute_and_hour_are_hashed_independently() -> None:
    pairs = Counter(tuple(resolve_hashed("H H * * *", lid).split()[:2]) for lid in LEARNERS)
    hours = Counter(h for _, h in pairs)
    assert set(hours) == {str(h) for h in range(24)}
    # 10,000 independent draws from 1,440 (hour, minute) pairs leave about one pair unused.
    assert len(pairs) > 1400


@pytest.mark.parametrize(("schedule", "field", "low", "high", "allowed", "count"), [
    ("H(10-19) 2 * * *", 0, 0, 59, set(range(10, 20)), 1),
    ("0 H(1-4) * * *", 1, 0, 23, set(range(1, 5)), 1),
    ("H/15 * * * *", 0, 0, 59, set(range(60)), 4),          # every 15 minutes from an offset below 15
    ("H(0-29)/10 2 * * *", 0, 0, 59, set(range(30)), 3),    # 3 runs in the first half hour
    ("0 H/6 * * *", 1, 0, 23, set(range(24)), 4),
])
def test_hashed_forms_select_what_they_say(schedule: str, field: int, low: int, high: int, allowed: set[int],
                                           count: int) -> None:
    offsets = set()
    for lid in LEARNERS[:500]:
        resolved = resolve_hashed(schedule, lid)
        assert re.match(CRON_5_FIELDS, resolved) and "H" not in resolved
        values = expand(resolved.split()[field], low, high)
        assert values <= allowed and len(values) == count, resolved
        if count > 1:  # evenly spaced by the step
            step = int(schedule.split()[field].rsplit("/", 1)[1])
            assert sorted(values) == list(range(min(values), min(values) + step * count, step))
        offsets.add(min(values))
    assert len(offsets) > 1  # the offset really depends on the learner


def test_only_hashed_items_change() -> None:
    assert resolve_hashed("*/15 2-4 1,15 JAN-MAR MON-FRI", "ada") == "*/15 2-4 1,15 JAN-MAR MON-FRI"
    first = resolve_hashed("5,H 2 * * 1-5", "ada")
    assert first.startswith("5,") and first.endswith(" 2 * * 1-5")


def test_the_default_window_spreads_the_fleet_evenly_and_stably() -> None:
    window = Window.parse("02:00-05:00")
    times = []
    for lid in LEARNERS:
        minute, hour, *rest = effective(None, lid, window).split()
        assert rest == ["*", "*", "*"]
        times.append(int(hour) * 60 + int(minute))
    assert min(times) >= 120 and max(times) < 300
    per_minute = Counter(times)
    assert len(per_minute) == 180  # 10,000 learners use every minute of the window
    assert max(per_minute.values()) < 2 * 10_000 / 180  # and no minute holds twice its share
    assert effective(None, "ada", window) == effective(None, "ada", Window.parse("02:00-05:00"))


def test_a_window_may_pass_midnight() -> None:
    window = Window.parse("22:30-01:30")
    assert window == Window(start=22 * 60 + 30, length=180)
    for lid in LEARNERS[:2000]:
        minute, hour = map(int, effective(None, lid, window).split()[:2])
        t = hour * 60 + minute
        assert t >= 22 * 60 + 30 or t < 90
    assert Window.parse("00:00-24:00").length == 24 * 60


@pytest.mark.parametrize("text", ["", "2-5", "02:00", "02:00-02:00", "25:00-26:00", "02:60-03:00", "02:00-24:30"])
def test_bad_windows_are_refused_with_the_format(text: str) -> None:
    with pytest.raises(ValueError, match="window"):
        Window.parse(text)


def test_an_explicit_schedule_wins_over_the_window() -> None:
    assert effective("0 2 * * *", "ada", Window.parse("02:00-05:00")) == "0 2 * * *"
