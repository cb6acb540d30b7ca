"""Merge schedules that spread a fleet: hashed cron fields and the cluster's default window.

Ten thousand learners on ``0 2 * * *`` would start ten thousand GPU merges in the same minute.
Two things spread them, both stable per learner, both derived from the immutable learnerId alone:

- **Hashed fields**, as Jenkins' ``H``: in the minute or hour field of ``spec.merge.schedule``,
  ``H`` is one value of the field's range, ``H(a-b)`` one value of ``a-b``, and ``H/n`` or
  ``H(a-b)/n`` every n-th value from an offset below n. ``H 2 * * *`` runs at a learner's own
  minute past two, every night the same.
- **The default window.** A learner without a schedule gets one run a day at a point of the
  cluster's window (``PRIVATEFM_DEFAULT_SCHEDULE_WINDOW``, ``02:00-05:00`` by default), in the
  schedule's time zone. A window may pass midnight (``22:00-04:00``).

The hash is SHA-256 of a field-specific salt and the learnerId, so the minute and the hour of
``H H * * *`` are independent, and learners land uniformly (not round-robin: no learner's time
depends on another's, and none moves when others come and go). The CronJob carries the result;
the LearnerNamespace's ``status.mergeSchedule`` shows it.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

# An H item: H, H(a-b), H/n, H(a-b)/n. The CRD's CEL rules admit exactly these, in the minute and
# hour fields only (api.CRON_FIELDS), with a <= b and n >= 1.
H_ITEM = re.compile(r"^H(?:\((\d+)-(\d+)\))?(?:/(\d+))?$")
HASHED_FIELDS = {0: (0, 59), 1: (0, 23)}  # field index: its range
WINDOW = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]|24):([0-5]\d)$")
DAY = 24 * 60


def spread(learner_id: str, salt: str) -> int:
    """A stable, uniformly distributed number for one learner and one use."""
    return int.from_bytes(hashlib.sha256(f"{salt}\0{learner_id}".encode()).digest()[:8], "big")


def _hashed_item(item: str, low: int, high: int, h: int) -> str:
    match = H_ITEM.match(item)
    if match is None:
        return item
    a, b = (int(match[1]), int(match[2])) if match[1] else (low, high)
    if match[3] is None:
        return str(a + h % (b - a + 1))
    step = int(match[3])
    start = a + h % min(step, b - a + 1)
    return f"{start}-{b}/{step}"


def resolve_hashed(schedule: str, learner_id: str) -> str:
    """The schedule with its H items replaced by this learner's values; other fields unchanged."""
    fields = schedule.split()
    for index, (low, high) in HASHED_FIELDS.items():
        h = spread(learner_id, f"cron-field-{index}")
        fields[index] = ",".join(_hashed_item(item, low, high, h) for item in fields[index].split(","))
    return " ".join(fields)


@dataclass(frozen=True)
class Window:
    """A daily window of ``length`` minutes from ``start`` (minutes after midnight)."""

    start: int
    length: int

    @classmethod
    def parse(cls, text: str) -> Window:
        match = WINDOW.match(text.strip())
        if match is None:
            raise ValueError(f"a schedule window is HH:MM-HH:MM (e.g. 02:00-05:00), not {text!r}")
        start = int(match[1]) * 60 + int(match[2])
        end = int(match[3]) * 60 + int(match[4])
        if end > DAY:
            raise ValueError(f"a schedule window ends at 24:00 at the latest, not {text!r}")
        if end == start:
            raise ValueError(f"a schedule window must not be empty: {text!r}")
        return cls(start, (end - start) % DAY or DAY)  # 00:00-24:00 is the whole day

    def point(self, learner_id: str) -> str:
        """The learner's daily time in the window, as a cron schedule."""
        minute = (self.start + spread(learner_id, "default-window") % self.length) % DAY
        return f"{minute % 60} {minute // 60} * * *"


def effective(schedule: str | None, learner_id: str, window: Window) -> str:
    """What the learner's CronJob runs on."""
    if schedule is None:
        return window.point(learner_id)
    return resolve_hashed(schedule, learner_id)
