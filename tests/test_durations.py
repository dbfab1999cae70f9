from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from migrator.durations import format_duration, parse_duration


@pytest.mark.parametrize(
    "text,seconds",
    [("0s", 0), ("90s", 90), ("30m", 1800), ("48h", 172800), ("7d", 604800), ("1h30m", 5400), ("250ms", 0.25), (15, 15)],
)
def test_parses_the_documented_forms(text, seconds):
    """Every duration form the playbook documents parses to the right number of seconds."""
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "7", "7 days", "d7", "-5s", "5x", True, None, "1h 30", -3])
def test_rejects_what_is_not_a_duration(text):
    """Anything that is not a duration is an error, not a silent zero (a bare "7" is ambiguous)."""
    with pytest.raises(ValueError):
        parse_duration(text)


@given(st.integers(min_value=0, max_value=10**7))
def test_format_then_parse_keeps_whole_minutes(seconds):
    """Formatting keeps the two largest units, so parsing it back is within one of the smaller unit."""
    td = timedelta(seconds=seconds)
    back = parse_duration(format_duration(td))
    assert back <= td
    assert td - back < timedelta(hours=1) if seconds >= 86400 else td - back < timedelta(minutes=1)


def test_format_is_human():
    """Evidence strings read like '2h13m of 7d'."""
    assert format_duration(timedelta(hours=2, minutes=13, seconds=5)) == "2h13m"
    assert format_duration(timedelta(days=7)) == "7d"
    assert format_duration(timedelta(0)) == "0s"
