"""Usage windows (`from` / `to` / `bucket`) and the usage JSON: r1nest.usage, without I/O."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from r1nest.errors import BadRequest
from r1nest.ledger.base import UsageBucket
from r1nest.usage import (
    BUCKETS,
    MAX_BUCKETS,
    MAX_UNIX_S,
    Window,
    filled,
    from_json,
    parse_time,
    parse_window,
    recent_window,
    totals,
    usage_json,
)

NOW = datetime(2026, 11, 30, 14, 25, 7, tzinfo=UTC).timestamp()
DAY, HOUR = 86400, 3600


def ts(*parts: int) -> float:
    return datetime(*parts, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1764547200", 1764547200.0),
        ("1764547200.5", 1764547200.5),
        ("0", 0.0),
        ("2026-11-30", ts(2026, 11, 30)),
        ("2026-11-30T12:00:00Z", ts(2026, 11, 30, 12)),
        ("2026-11-30T12:00:00z", ts(2026, 11, 30, 12)),
        ("2026-11-30T12:00", ts(2026, 11, 30, 12)),  # no offset: UTC
        ("2026-11-30T14:00:00+02:00", ts(2026, 11, 30, 12)),
        ("2026-11-30T07:00:00-05:00", ts(2026, 11, 30, 12)),
        ("2026-11-30 12:00:00.250Z", ts(2026, 11, 30, 12) + 0.25),
        ("90m", NOW - 90 * 60),
        ("24h", NOW - DAY),
        ("7d", NOW - 7 * DAY),
        ("30d", NOW - 30 * DAY),
        ("2w", NOW - 14 * DAY),
        (" 24h ", NOW - DAY),
    ],
)
def test_times_in_every_accepted_form(text: str, expected: float) -> None:
    assert parse_time(text, now=NOW, param="from") == pytest.approx(expected)


@pytest.mark.parametrize(
    "text",
    ["", "  ", "nan", "NaN", "inf", "-inf", "Infinity", "1e9", "-5", "+5", "0x10", "yesterday", "24 h",
     "1.5d", "-24h", "24H", "2026-13-01", "2026-11-31", "2026-11-30T25:00", "99999999999999", "12345678901234567",
     "9999999d", "2026-11-30T12:00:00+25:00", "2026-W48-1", "'; drop table", "x" * 200, "１２３", "0001-01-01",
     "1969-12-31T23:59:59Z"],
)
def test_garbage_times_are_a_bad_request_naming_the_parameter(text: str) -> None:
    with pytest.raises(BadRequest) as refused:
        parse_time(text, now=NOW, param="to")
    assert refused.value.param == "to" and refused.value.status_code == 400
    assert 20 < len(refused.value.message) < 300


def test_defaults_are_thirty_days_by_day_until_now() -> None:
    window = parse_window(start=None, end=None, bucket=None, now=NOW)
    assert window == Window(since=ts(2026, 10, 31), until=NOW, bucket="day", bucket_s=DAY)
    assert window.bucket_count == 31  # 30 whole days back, floored to the day: the first one is whole
    assert parse_window(start="", end=" ", bucket="", now=NOW) == window


def test_since_is_floored_to_the_bucket_and_until_is_kept() -> None:
    hourly = parse_window(start="24h", end=None, bucket="hour", now=NOW)
    assert hourly.since == ts(2026, 11, 29, 14) and hourly.until == NOW
    assert hourly.bucket_count == 25
    daily = parse_window(start="2026-11-01T18:30:00Z", end="2026-11-08", bucket="DAY", now=NOW)
    assert (daily.since, daily.until, daily.bucket, daily.bucket_count) == (ts(2026, 11, 1), ts(2026, 11, 8), "day", 7)
    assert daily.starts() == [ts(2026, 11, d) for d in range(1, 8)]


def test_default_start_follows_an_explicit_end() -> None:
    window = parse_window(start=None, end="2026-06-30", bucket="day", now=NOW)
    assert (window.since, window.until) == (ts(2026, 5, 31), ts(2026, 6, 30))


@pytest.mark.parametrize(
    ("start", "end", "bucket", "param"),
    [
        ("2026-11-30", "2026-11-30", "day", "from"),  # empty
        ("2026-12-01", "2026-11-30", "day", "from"),  # reversed
        ("1h", "2h", "hour", "from"),  # reversed spans
        ("2026-12-01", None, None, "from"),  # in the future, to = now
        ("1d", None, "week", "bucket"),
        ("1d", None, "3600", "bucket"),
        (None, None, "minute", "bucket"),
        ("2000h", None, "hour", "from"),  # 2001 hour buckets
        ("0", None, "hour", "from"),  # since 1970 by the hour
        ("nan", None, "day", "from"),
        (None, "inf", "day", "to"),
    ],
)
def test_bad_windows_are_refused_with_the_parameter(start, end, bucket, param) -> None:
    with pytest.raises(BadRequest) as refused:
        parse_window(start=start, end=end, bucket=bucket, now=NOW)
    assert refused.value.param == param, refused.value.message


def test_max_buckets_is_allowed_and_one_more_is_not() -> None:
    now = ts(2026, 11, 30)  # on an hour boundary: n hours back is exactly n buckets
    assert parse_window(start=f"{MAX_BUCKETS}h", end=None, bucket="hour", now=now).bucket_count == MAX_BUCKETS
    with pytest.raises(BadRequest, match="more than 2000"):
        parse_window(start=f"{MAX_BUCKETS + 1}h", end=None, bucket="hour", now=now)


def test_all_time_by_day_is_refused_but_names_the_fix() -> None:
    with pytest.raises(BadRequest) as refused:
        parse_window(start="0", end=None, bucket="day", now=NOW)
    assert "shorten it" in refused.value.message


_TIME_TEXT = st.one_of(
    st.text(max_size=30),
    st.integers(min_value=-10**13, max_value=10**13).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.builds(lambda n, u: f"{n}{u}", st.integers(0, 10**8), st.sampled_from("smhdwy")),
    st.datetimes(timezones=st.just(UTC)).map(lambda d: d.isoformat()),
)


@settings(max_examples=400, deadline=None)
@given(start=st.none() | _TIME_TEXT, end=st.none() | _TIME_TEXT,
       bucket=st.none() | st.sampled_from(["hour", "day", "Hour", "minute", ""]) | st.text(max_size=8),
       now=st.floats(min_value=10 * DAY, max_value=4e9))
def test_any_input_is_a_window_that_holds_its_rules_or_a_bad_request(start, end, bucket, now) -> None:
    try:
        window = parse_window(start=start, end=end, bucket=bucket, now=now)
    except BadRequest as refused:
        assert refused.param in ("from", "to", "bucket")
        return
    assert window.bucket in BUCKETS and window.bucket_s == BUCKETS[window.bucket]
    assert window.since % window.bucket_s == 0, "buckets are whole"
    assert 0 <= window.since < window.until <= MAX_UNIX_S
    assert math.isfinite(window.since) and math.isfinite(window.until)
    assert 1 <= window.bucket_count <= MAX_BUCKETS
    assert window.starts()[-1] < window.until <= window.starts()[-1] + window.bucket_s


@settings(max_examples=200, deadline=None)
@given(start=st.floats(min_value=0, max_value=4e9), span=st.floats(min_value=1, max_value=80 * DAY),
       bucket=st.sampled_from(sorted(BUCKETS)))
def test_the_floor_moves_since_back_by_less_than_one_bucket(start, span, bucket) -> None:
    start_text, end_text = f"{start:.6f}", f"{start + span:.6f}"
    try:
        window = parse_window(start=start_text, end=end_text, bucket=bucket, now=5e9)
    except BadRequest as refused:  # only too many buckets, or an empty window after rounding
        assert refused.param == "from"
        return
    assert window.since <= float(start_text) < window.since + window.bucket_s


def test_recent_window_is_exactly_count_buckets_ending_with_the_current_one() -> None:
    hourly = recent_window("hour", 24, now=NOW)
    assert hourly.bucket_count == 24
    assert hourly.starts()[-1] == ts(2026, 11, 30, 14) and hourly.since == ts(2026, 11, 29, 15)
    daily = recent_window("day", 30, now=NOW)
    assert daily.bucket_count == 30 and daily.starts()[-1] == ts(2026, 11, 30)
    assert (hourly.until, daily.until) == (ts(2026, 11, 30, 15), ts(2026, 12, 1))  # the current bucket, whole
    on_boundary = recent_window("day", 1, now=ts(2026, 11, 30))
    assert (on_boundary.since, on_boundary.until) == (ts(2026, 11, 30), ts(2026, 12, 1))  # never empty
    with pytest.raises(ValueError):
        recent_window("day", 0, now=NOW)


def bucket(start: float, requests: int = 1, prompt: int = 10, cached: int = 4, completion: int = 20, credits: int = 30):
    return UsageBucket(start, requests, prompt, cached, completion, credits)


def test_usage_json_shape_and_totals() -> None:
    window = parse_window(start="2026-11-28", end="2026-11-30T12:00:00Z", bucket="day", now=NOW)
    buckets = [bucket(ts(2026, 11, 28), 2, 100, 40, 300, 1000), bucket(ts(2026, 11, 30), 1, 5, 0, 7, 12)]
    body = usage_json(window, buckets, key_id="0123456789ab")
    assert body == {
        "object": "usage", "key": "0123456789ab", "bucket": "day",
        "from": ts(2026, 11, 28), "to": ts(2026, 11, 30, 12),
        "data": [
            {"start": ts(2026, 11, 28), "start_iso": "2026-11-28T00:00:00Z", "requests": 2, "prompt_tokens": 100,
             "cached_tokens": 40, "completion_tokens": 300, "credits": 1000},
            {"start": ts(2026, 11, 30), "start_iso": "2026-11-30T00:00:00Z", "requests": 1, "prompt_tokens": 5,
             "cached_tokens": 0, "completion_tokens": 7, "credits": 12},
        ],
        "totals": {"requests": 3, "prompt_tokens": 105, "cached_tokens": 40, "completion_tokens": 307, "credits": 1012},
    }
    assert json.loads(json.dumps(body, allow_nan=False)) == body
    assert usage_json(window, [], key_id=None)["totals"] == dict.fromkeys(body["totals"], 0)


def test_json_round_trips_and_foreign_answers_are_refused() -> None:
    window = parse_window(start="7d", end=None, bucket="hour", now=NOW)
    buckets = [bucket(window.since + 3 * HOUR), bucket(window.since + 40 * HOUR, credits=2**53 - 1)]
    body = json.loads(json.dumps(usage_json(window, buckets, key_id=None)))
    assert from_json(body) == (window, buckets)
    for broken in (
        None, [], {"object": "list"}, {**body, "bucket": "week"}, {**body, "from": body["to"]},
        {**body, "from": float("nan")}, {**body, "data": {}}, {**body, "data": [{"start": 1}]},
        {**body, "data": [{**body["data"][0], "credits": -1}]}, {**body, "data": [{**body["data"][0], "requests": True}]},
        {**body, "data": [{**body["data"][0], "prompt_tokens": 1.5}]}, {**body, "from": 0, "to": 4e9},
    ):
        with pytest.raises(ValueError):
            from_json(broken)


def test_filled_has_every_bucket_with_zeros_in_the_gaps() -> None:
    window = recent_window("hour", 24, now=NOW)
    inside = [bucket(window.since), bucket(window.since + 5 * HOUR, credits=7)]
    outside = [bucket(window.since - HOUR), bucket(window.since + 24 * HOUR)]
    every = filled(window, inside + outside)
    assert [b.start for b in every] == window.starts()
    assert [b.credits for b in every if b.requests] == [30, 7]
    assert sum(b.requests for b in every) == 2
    assert totals(every) == totals(inside)
