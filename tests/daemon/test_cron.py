"""Cron expressions: parsing, next times across months and DST, and clear errors."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from depdrill.daemon.cron import parse_cron
from depdrill.errors import InputError

UTC_ZONE = ZoneInfo("UTC")


def _next(expr: str, after: datetime, zone: str = "UTC") -> datetime:
    return parse_cron(expr).next_after(after, ZoneInfo(zone))


def test_nightly_schedule_runs_at_two_the_next_day_once_past() -> None:
    # Given a nightly schedule and a moment after tonight's run
    after = datetime(2026, 3, 10, 2, 0, tzinfo=UTC)
    # When the next run is computed
    # Then it is strictly later: the next night at 02:00
    assert _next("0 2 * * *", after) == datetime(2026, 3, 11, 2, 0, tzinfo=UTC_ZONE)


def test_steps_ranges_lists_and_names() -> None:
    # Given every-15-minutes during 9-17 on weekdays named by text
    cron = parse_cron("*/15 9-17 * * mon-fri")
    # Then the fields hold exactly those values
    assert cron.minutes == {0, 15, 30, 45}
    assert cron.hours == set(range(9, 18))
    assert cron.weekdays == {1, 2, 3, 4, 5}
    # And Friday 17:45 is followed by Monday 09:00
    friday = datetime(2026, 11, 27, 17, 45, tzinfo=UTC)
    assert _next("*/15 9-17 * * mon-fri", friday) == datetime(2026, 11, 30, 9, 0, tzinfo=UTC_ZONE)
    # And lists, steps over ranges and month names combine
    assert parse_cron("5,10-20/5 0 1 jan,JUL *").minutes == {5, 10, 15, 20}
    assert parse_cron("0 0 1 jan,JUL *").months == {1, 7}


def test_sunday_is_both_zero_and_seven() -> None:
    assert parse_cron("0 0 * * 7").weekdays == parse_cron("0 0 * * sun").weekdays == {0}


def test_day_of_month_or_day_of_week_when_both_are_restricted() -> None:
    # Given the 13th or any Friday (cron's OR rule)
    # When asked after Wednesday 2026-11-11
    got = _next("0 0 13 * fri", datetime(2026, 11, 11, 0, 0, tzinfo=UTC))
    # Then Friday the 13th comes first
    assert got == datetime(2026, 11, 13, 0, 0, tzinfo=UTC_ZONE)
    # And from the 13th the next is Friday the 20th (a Friday, not a 13th)
    got = _next("0 0 13 * fri", datetime(2026, 11, 13, 0, 0, tzinfo=UTC))
    assert got == datetime(2026, 11, 20, 0, 0, tzinfo=UTC_ZONE)


def test_timezone_and_the_spring_forward_gap() -> None:
    # Given 02:30 in Berlin, which does not exist on 2026-03-29 (clocks jump 02:00 -> 03:00)
    after = datetime(2026, 3, 28, 12, 0, tzinfo=UTC)
    # When the next run is computed
    got = _next("30 2 * * *", after, "Europe/Berlin")
    # Then that night is skipped, and the run is 02:30 local (00:30 UTC) the next day
    assert got.astimezone(UTC) == datetime(2026, 3, 30, 0, 30, tzinfo=UTC)


def test_leap_day_schedule_finds_the_next_leap_year() -> None:
    got = _next("0 0 29 2 *", datetime(2026, 1, 1, tzinfo=UTC))
    assert got == datetime(2028, 2, 29, 0, 0, tzinfo=UTC_ZONE)


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("0 2 * *", "needs 5 fields"),
        ("60 * * * *", "minute '60': out of range 0-59"),
        ("* 5-1 * * *", "range runs backwards"),
        ("*/0 * * * *", "a step is a whole number"),
        ("* * * foo *", "month 'foo': expected a number 1-12 or a name"),
        ("0 0 31 2 *", "never matches a real date"),
    ],
)
def test_bad_expressions_say_which_field(expr: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        parse_cron(expr)
