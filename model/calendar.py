"""The calendar: absolute times -> the model's ``tod``/``dow`` inputs, one function for training and serving.

A checkpoint records ``calendar = {"start": ISO-8601 with a UTC offset, "zone": IANA name}``: the time of
the data's step 0 and the zone its days are counted in. Step ``k`` is at ``start + k * interval``
(``interval = 86400 / steps_per_day`` s). :func:`time_features` turns absolute times into the local
wall-clock slot (``tod``: slots are skipped and repeated on daylight-saving days) and the local weekday
(``dow``, Monday = 0); :class:`Grid` checks times against the step grid. Training windows
(:class:`~stvfm_engine.model.data.Windows`) and forecast streams both call these, so they cannot disagree.

Times are exchanged in UTC (``datetime`` with ``timezone.utc``): an aware datetime in a zone's repeated
hour compares unequal to every datetime of another zone (PEP 495), so local times never leave this module.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable, Optional
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import numpy as np

from stvfm_engine.errors import ConfigError, InputError

DAY_US = 86_400_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
# A calendar that reproduces the step-index features of checkpoints written before calendars
# (tod = step % steps_per_day, dow = (start_dow + step // steps_per_day) % 7): UTC, step 0 at a Monday 00:00.
_MONDAY = datetime(2024, 1, 1, tzinfo=timezone.utc)


def parse_time(value: Any, what: str = "time") -> datetime:
    """An aware ``datetime`` or an ISO-8601 string (``str`` or UTF-8 ``bytes``) with a UTC offset -> the same
    instant in UTC."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        try:
            t = datetime.fromisoformat(value.strip())
        except ValueError:
            raise InputError(f"{what}: expected ISO-8601 with a UTC offset (e.g. 2026-11-01T05:30:00Z), "
                             f"got {value!r}") from None
    elif isinstance(value, datetime):
        t = value
    else:
        raise InputError(f"{what}: expected an aware datetime or an ISO-8601 string, got {type(value).__name__}")
    if t.tzinfo is None or t.utcoffset() is None:
        raise InputError(f"{what}: expected an aware time (with a UTC offset or zone), got the naive {t.isoformat()}")
    return t.astimezone(timezone.utc)


def to_us(t: datetime) -> int:
    """Microseconds since the Unix epoch of an aware time."""
    return (t - _EPOCH) // timedelta(microseconds=1)


def from_us(us: int) -> datetime:
    """The UTC datetime of microseconds since the Unix epoch."""
    return _EPOCH + timedelta(microseconds=int(us))


def iso(t: datetime) -> str:
    """ISO-8601 in UTC with a ``Z`` (``2026-11-01T05:30:00Z``)."""
    return t.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def zone(name: Any) -> ZoneInfo:
    """The IANA zone ``name`` (one-line :class:`ConfigError` when unknown)."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"calendar zone: expected an IANA zone name (e.g. America/New_York), got {name!r}")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"calendar zone: unknown IANA zone {name!r} (e.g. America/New_York, Europe/Paris, UTC)") from None


def normalize_calendar(calendar: Any) -> dict[str, str]:
    """``{"start": ISO-8601 with an offset, "zone": IANA name}`` checked, with ``start`` written in UTC."""
    if not isinstance(calendar, dict) or set(calendar) != {"start", "zone"}:
        got = sorted(calendar) if isinstance(calendar, dict) else type(calendar).__name__
        raise ConfigError(f"calendar: expected {{'start': ISO time, 'zone': IANA name}}, got {got}")
    try:
        start = parse_time(calendar["start"], "calendar start")
    except InputError as e:
        raise ConfigError(str(e)) from None
    zone(calendar["zone"])
    return {"start": iso(start), "zone": calendar["zone"]}


def calendar_from_start_dow(start_dow: int) -> dict[str, str]:
    """The calendar of a checkpoint written with the old ``start_dow``: UTC, step 0 at 00:00 of that weekday."""
    if not isinstance(start_dow, int) or isinstance(start_dow, bool) or not 0 <= start_dow < 7:
        raise ConfigError(f"start_dow must be in [0, 7), got {start_dow!r}")
    return {"start": iso(_MONDAY + timedelta(days=start_dow)), "zone": "UTC"}


def time_features(times: Iterable[datetime], zone_name: str, steps_per_day: int) -> tuple[np.ndarray, np.ndarray]:
    """THE calendar function: ``tod`` (local wall-clock slot ``(h*3600 + m*60 + s) // interval``) and ``dow``
    (local weekday, Monday = 0) of aware times in ``zone_name``, int64 arrays of the times' length."""
    if steps_per_day < 1:
        raise ConfigError(f"time features need steps_per_day >= 1, got {steps_per_day}")
    z = zone(zone_name)
    tod, dow = [], []
    for t in times:
        local = t.astimezone(z)
        tod.append((local.hour * 3600 + local.minute * 60 + local.second) * steps_per_day // 86400)
        dow.append(local.weekday())
    return np.asarray(tod, dtype=np.int64), np.asarray(dow, dtype=np.int64)


@dataclass(frozen=True)
class Grid:
    """The time grid of one model: step ``k`` is at ``start_us + k * interval_us`` (microseconds since the
    Unix epoch); ``zone``/``steps_per_day`` give the time features (``zone`` None: the model takes none)."""

    start_us: int
    interval_us: int
    zone: Optional[str]
    steps_per_day: int

    @property
    def interval(self) -> timedelta:
        return timedelta(microseconds=self.interval_us)

    def step(self, t: datetime, what: str = "time") -> int:
        """The step index of an aware time on the grid (an :class:`InputError` naming the grid otherwise)."""
        k, rest = divmod(to_us(t) - self.start_us, self.interval_us)
        if rest:
            before = from_us(self.start_us + k * self.interval_us)
            raise InputError(f"{what} {iso(t)} is off the {self.interval_us / 1e6:g} s grid; the nearest steps "
                             f"are {iso(before)} and {iso(before + self.interval)}")
        return int(k)

    def time(self, k: int) -> datetime:
        return from_us(self.start_us + int(k) * self.interval_us)

    def features(self, steps: Iterable[int]) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
        """``tod``/``dow`` int64 of step indices (None, None for a model without time inputs)."""
        if self.zone is None:
            return None, None
        return time_features((self.time(k) for k in steps), self.zone, self.steps_per_day)


def grid_for(steps_per_day: int, calendar: Optional[dict], interval: Optional[float] = None,
             what: str = "this model") -> Grid:
    """The :class:`Grid` of a model with ``steps_per_day`` and ``calendar`` (a model without time inputs
    needs ``interval`` seconds; its grid starts at the calendar's start, else at the Unix epoch)."""
    cal = normalize_calendar(calendar) if calendar is not None else None
    if steps_per_day > 0:
        if cal is None:
            raise ConfigError(f"{what} has no calendar: pass calendar={{'start': ISO time, 'zone': IANA name}} "
                              "(or rebuild from a checkpoint written with --start and --zone)")
        if DAY_US % steps_per_day:
            raise ConfigError(f"steps_per_day {steps_per_day} does not divide a day into whole microseconds")
        if interval is not None and abs(interval * 1e6 - DAY_US // steps_per_day) > 0.5:
            raise ConfigError(f"interval {interval:g} s disagrees with steps_per_day {steps_per_day} "
                              f"({86400 / steps_per_day:g} s); leave it out")
        return Grid(to_us(parse_time(cal["start"])), DAY_US // steps_per_day, cal["zone"], steps_per_day)
    if interval is None or not isinstance(interval, (int, float)) or not 0 < interval * 1e6 < 1e18 \
            or abs(interval * 1e6 - round(interval * 1e6)) > 1e-3:
        raise ConfigError(f"{what} takes no time inputs (steps_per_day 0): pass interval=SECONDS (whole "
                          f"microseconds, > 0), got {interval!r}")
    start = to_us(parse_time(cal["start"])) if cal is not None else 0
    return Grid(start, int(round(interval * 1e6)), None, 0)
