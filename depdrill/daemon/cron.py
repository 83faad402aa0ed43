"""Five-field cron expressions (minute hour day-of-month month day-of-week) and their next time."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from depdrill.errors import InputError

_MONTHS = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
_DAYS = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]
# A schedule such as `0 0 29 2 1` (Feb 29 that is a Monday) recurs only every 28 years.
_SEARCH_DAYS = 366 * 29


@dataclass(frozen=True)
class _Field:
    name: str
    low: int
    high: int
    names: tuple[str, ...] = ()  # text aliases, the first one meaning `low`


_FIELDS = (
    _Field("minute", 0, 59),
    _Field("hour", 0, 23),
    _Field("day of month", 1, 31),
    _Field("month", 1, 12, tuple(_MONTHS)),
    _Field("day of week", 0, 7, tuple(_DAYS)),
)


@dataclass(frozen=True)
class Cron:
    """A parsed schedule; `next_after` gives the next matching minute in its timezone."""

    text: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    days_restricted: bool
    weekdays_restricted: bool

    def matches_day(self, day: date) -> bool:
        if day.month not in self.months:
            return False
        weekday = (day.weekday() + 1) % 7
        in_days, in_weekdays = day.day in self.days, weekday in self.weekdays
        # cron's rule: when both day fields are restricted, either one matching is enough.
        if self.days_restricted and self.weekdays_restricted:
            return in_days or in_weekdays
        return in_days and in_weekdays

    def next_after(self, moment: datetime, zone: ZoneInfo) -> datetime:
        """The first matching minute strictly after `moment` (aware), as an aware datetime."""
        local = moment.astimezone(zone)
        day = local.date()
        for _ in range(_SEARCH_DAYS):
            if self.matches_day(day):
                for hour in sorted(self.hours):
                    for minute in sorted(self.minutes):
                        wall = datetime(day.year, day.month, day.day, hour, minute, tzinfo=zone)
                        # A wall time inside a DST gap does not exist: it comes back shifted.
                        if wall.astimezone(ZoneInfo("UTC")).astimezone(zone).replace(
                            tzinfo=None
                        ) != wall.replace(tzinfo=None):
                            continue
                        if wall > moment:
                            return wall
            day += timedelta(days=1)
        raise InputError(f"cron {self.text!r}: never matches a real date")


def parse_cron(text: str) -> Cron:
    """`*/15 2-4 * jan-jun mon,fri` -> a Cron; InputError with the field at fault otherwise."""
    parts = text.split()
    if len(parts) != 5:
        raise InputError(
            f"cron {text!r}: needs 5 fields (minute hour day-of-month month day-of-week), "
            f"got {len(parts)}"
        )
    values = [_parse_field(part, spec, text) for part, spec in zip(parts, _FIELDS, strict=True)]
    weekdays = frozenset(d % 7 for d in values[4])  # 7 is Sunday too
    cron = Cron(
        text=text,
        minutes=values[0],
        hours=values[1],
        days=values[2],
        months=values[3],
        weekdays=weekdays,
        days_restricted=not parts[2].startswith("*"),
        weekdays_restricted=not parts[4].startswith("*"),
    )
    start = date(2000, 1, 1)
    if not any(cron.matches_day(start + timedelta(days=n)) for n in range(_SEARCH_DAYS)):
        raise InputError(f"cron {text!r}: never matches a real date")
    return cron


def _parse_field(text: str, spec: _Field, whole: str) -> frozenset[int]:
    found: set[int] = set()
    for item in text.split(","):
        found |= _parse_item(item, spec, whole)
    return frozenset(found)


def _parse_item(item: str, spec: _Field, whole: str) -> set[int]:
    def bad(why: str) -> InputError:
        return InputError(f"cron {whole!r}: {spec.name} {item!r}: {why}")

    base, _, step_text = item.partition("/")
    step = 1
    if step_text:
        if not step_text.isdigit() or int(step_text) == 0:
            raise bad("a step is a whole number of at least 1")
        step = int(step_text)
    if base == "*":
        low, high = spec.low, spec.high
    elif "-" in base:
        first, _, last = base.partition("-")
        low, high = _value(first, spec, bad), _value(last, spec, bad)
        if low > high:
            raise bad(f"range runs backwards ({low} > {high})")
    else:
        low = _value(base, spec, bad)
        high = spec.high if step_text else low
    return set(range(low, high + 1, step))


def _value(text: str, spec: _Field, bad: Callable[[str], InputError]) -> int:
    lowered = text.lower()
    if lowered in spec.names:
        return (
            spec.low + spec.names.index(lowered) if spec.name == "month" else _DAYS.index(lowered)
        )
    if not text.isdigit():
        expected = f"a number {spec.low}-{spec.high}" + (" or a name" if spec.names else "")
        raise bad(f"expected {expected}")
    value = int(text)
    if not spec.low <= value <= spec.high:
        raise bad(f"out of range {spec.low}-{spec.high}")
    return value
