"""`r1nest usage` on a real SQLite ledger (the local store) and against a running gateway's
`GET /admin/usage` (`--url`): the real gateway app on uvicorn on loopback."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from r1nest.errors import ConfigError, R1nestError, UnknownKey
from r1nest.keys import hash_key, new_key
from r1nest.ledger.base import Usage
from r1nest.ledger.sqlite import SqliteStore
from r1nest.usage_cli import column_chart, squeeze, usage

ADMIN_KEY = "r1nadmin-0d0d0d0d0d0d-" + "D" * 43
HOUR, DAY = 3600, 86400


@dataclass(frozen=True)
class Settled:
    key: str  # "a" or "b"
    hours_ago: float
    charged: int
    usage: Usage | None  # None: settled without token counts


# what happens in the ledger; the expected numbers are computed from this list, not from the store
EVENTS = [
    Settled("a", 1.5, 300, Usage(100, 40, 200)),
    Settled("a", 1.2, 15, Usage(10, 0, 5)),
    Settled("a", 5.0, 3, None),
    Settled("a", 30.0, 16, Usage(7, 7, 9)),
    Settled("a", 24 * 20, 50, Usage(20, 0, 30)),  # outside 48 h, inside 30 days
    Settled("a", 24 * 60, 999, Usage(999, 0, 999)),  # outside every window asked for below
    Settled("b", 3.0, 3000, Usage(1000, 500, 2000)),
]
VOIDED_HOURS_AGO = 2.0  # a reservation of key a that is voided: not a request


@dataclass
class Ledger:
    data_dir: Path
    now: float
    key_ids: dict[str, str]


def expected(ledger: Ledger, *, key: str | None, since_s: float, bucket_s: int) -> dict:
    """{"data": [...], "totals": {...}} as the window [floor(now - since_s), now) must sum it."""
    start = math.floor((ledger.now - since_s) / bucket_s) * bucket_s
    sums: dict[float, list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0])
    for event in EVENTS:
        at = ledger.now - event.hours_ago * HOUR
        if (key is not None and event.key != key) or at < start:
            continue
        row = sums[float(math.floor(at / bucket_s) * bucket_s)]
        counts = event.usage or Usage()
        for i, value in enumerate((1, counts.prompt_tokens, counts.cached_tokens, counts.completion_tokens, event.charged)):
            row[i] += value
    names = ("requests", "prompt_tokens", "cached_tokens", "completion_tokens", "credits")
    data = [{"start": s, **dict(zip(names, row))} for s, row in sorted(sums.items())]
    return {"data": data, "totals": {n: sum(d[n] for d in data) for n in names}}


def numbers(answer: dict) -> dict:
    """The answer's buckets and totals, without what depends on the moment it was asked."""
    return {"data": [{k: v for k, v in d.items() if k != "start_iso"} for d in answer["data"]], "totals": answer["totals"]}


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory) -> Ledger:
    data_dir = tmp_path_factory.mktemp("usage-ledger")
    # a moment in the middle of an hour, so that "hours ago" never lands on a bucket edge
    now = math.floor(time.time() / HOUR) * HOUR + 1800.0
    if now > time.time():
        now -= HOUR

    async def fill() -> dict[str, str]:
        store = SqliteStore(data_dir / "ledger.sqlite3")
        try:
            key_ids = {}
            for name in ("a", "b"):
                key_id, plaintext = new_key()
                await store.create_key(key_id=key_id, key_hash=hash_key(plaintext), name=name, credits=10**6,
                                       expires_at=None, now=now - 90 * DAY)
                key_ids[name] = key_id
            for event in EVENTS:
                at = now - event.hours_ago * HOUR
                reservation = await store.reserve(key_ids[event.key], 5000, ttl_s=600, now=at - 1)
                await store.settle(reservation.reservation_id, event.charged, now=at, usage=event.usage)
            voided = await store.reserve(key_ids["a"], 5000, ttl_s=600, now=now - VOIDED_HOURS_AGO * HOUR)
            await store.void(voided.reservation_id, now=now - VOIDED_HOURS_AGO * HOUR + 1)
            return key_ids
        finally:
            await store.close()

    return Ledger(data_dir=data_dir, now=now, key_ids=asyncio.run(fill()))


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(usage, list(args), env=env)


def ok(result: Result) -> str:
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout


def local(ledger: Ledger, *args: str) -> Result:
    return invoke(*args, "--data-dir", str(ledger.data_dir))


# local store ----------------------------------------------------------------------------------


def test_json_sums_every_settled_request_per_hour_for_all_keys(ledger: Ledger) -> None:
    before = time.time()
    answer = json.loads(ok(local(ledger, "--since", "48h", "--bucket", "hour", "--json")))
    after = time.time()
    assert answer["object"] == "usage" and answer["key"] is None and answer["bucket"] == "hour"
    assert answer["from"] in {math.floor((t - 48 * HOUR) / HOUR) * HOUR for t in (before, after)}
    assert answer["to"] == pytest.approx(time.time(), abs=60)
    assert numbers(answer) == expected(ledger, key=None, since_s=48 * HOUR, bucket_s=HOUR)
    assert answer["totals"]["requests"] == 5  # the voided reservation is no request
    assert all(d["start_iso"].endswith(":00:00Z") for d in answer["data"])


def test_one_key_by_day_over_the_default_thirty_days(ledger: Ledger) -> None:
    key_a = ledger.key_ids["a"]
    answer = json.loads(ok(local(ledger, "--key", key_a, "--json")))
    assert answer["key"] == key_a and answer["bucket"] == "day"
    assert numbers(answer) == expected(ledger, key="a", since_s=30 * DAY, bucket_s=DAY)
    assert answer["totals"]["credits"] == 300 + 15 + 3 + 16 + 50  # key b's and the 60-day-old request are out
    only_b = json.loads(ok(local(ledger, "--key", ledger.key_ids["b"], "--since", "7d", "--json")))
    assert only_b["totals"] == {"requests": 1, "prompt_tokens": 1000, "cached_tokens": 500,
                                "completion_tokens": 2000, "credits": 3000}


def test_an_explicit_window_in_iso_and_unix_seconds(ledger: Ledger) -> None:
    since, until = ledger.now - 6 * HOUR, ledger.now - HOUR
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since))
    answer = json.loads(ok(local(ledger, "--since", iso, "--until", f"{until:.0f}", "--bucket", "hour", "--json")))
    assert (answer["from"], answer["to"]) == (since - 1800, until)
    assert [d["credits"] for d in answer["data"]] == [3, 3000, 300 + 15]  # 5 h, 3 h and 1.5/1.2 h ago


def test_table_totals_and_chart(ledger: Ledger) -> None:
    text = ok(local(ledger, "--since", "48h", "--bucket", "hour"))
    lines = text.splitlines()
    assert lines[0].startswith("Usage of all keys by hour, ")
    header = next(line for line in lines if "REQUESTS" in line)
    assert header.split() == ["HOUR", "(UTC)", "REQUESTS", "PROMPT", "CACHED", "COMPLETION", "CREDITS"]
    totals = expected(ledger, key=None, since_s=48 * HOUR, bucket_s=HOUR)["totals"]
    total_line = next(line for line in lines if line.startswith("TOTAL"))
    assert total_line.split() == ["TOTAL", *(f"{totals[n]:,}" for n in
                                            ("requests", "prompt_tokens", "cached_tokens", "completion_tokens", "credits"))]
    assert "Credits per hour" in text
    chart = [line for line in lines if "│" in line]
    assert len(chart) == 8 and chart[0].split("│")[0].strip() == "3,000" and chart[-1].split("│")[0].strip() == "0"
    tokens = ok(local(ledger, "--since", "48h", "--bucket", "hour", "--chart", "tokens"))
    assert "Prompt + completion tokens per hour" in tokens and "3,000 │" in tokens  # 1,000 + 2,000


def test_an_empty_window_says_so(ledger: Ledger) -> None:
    text = ok(local(ledger, "--since", "2020-01-01", "--until", "2020-01-05"))
    assert "No requests were settled in this window." in text and "TOTAL" not in text


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--since", "yesterday"], "--since"),
        (["--since", "nan"], "--since"),
        (["--until", "inf"], "--until"),
        (["--since", "1d", "--until", "2d"], "--since"),
        (["--since", "3000h", "--bucket", "hour"], "--since"),
        (["--bucket", "week"], "--bucket"),
        (["--key", "nope"], "--key"),
        (["--key", "ABCDEF012345"], "--key"),
        (["--chart", "pie"], "--chart"),
    ],
)
def test_bad_input_is_a_usage_error_naming_the_flag(ledger: Ledger, args: list[str], flag: str) -> None:
    result = local(ledger, *args)
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{flag}'" in result.output or f"Invalid value for {flag}" in result.output, result.output
    assert "Traceback" not in result.output


def test_a_whole_key_in_place_of_an_id_is_refused_without_echoing_it(ledger: Ledger) -> None:
    _, key = new_key()
    result = local(ledger, "--key", key)
    assert result.exit_code == 2 and "not the key itself" in result.output and key not in result.output


def test_an_unknown_key_is_a_clear_error_through_the_entry_point(ledger: Ledger, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "r1nest", "usage", "--key", "000000000000", "--data-dir", str(ledger.data_dir)],
        capture_output=True, text=True, timeout=60, check=False, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert done.returncode == 1
    assert done.stderr.strip() == "error: no key with id 000000000000"
    assert "Traceback" not in done.stderr + done.stdout


def test_local_mode_follows_the_settings_to_dynamodb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """R1NEST_STORE=dynamodb: the same command on the shared table (moto's server on loopback)."""
    from r1nest.ledger.dynamodb import DynamoStore, create_table
    from r1nest.testing.dynamodb import FAKE_AWS_ENV, REGION, moto_dynamodb_server

    for name, value in FAKE_AWS_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    now = time.time()
    with moto_dynamodb_server() as endpoint:
        create_table("usage-cli", REGION, endpoint_url=endpoint)

        async def fill() -> str:
            store = DynamoStore("usage-cli", REGION, endpoint_url=endpoint)
            try:
                key_id, plaintext = new_key()
                await store.create_key(key_id=key_id, key_hash=hash_key(plaintext), name="d", credits=10_000,
                                       expires_at=None, now=now - DAY)
                for hours_ago, charged in ((1, 70), (3, 30), (30, 5)):
                    reservation = await store.reserve(key_id, 100, ttl_s=600, now=now - hours_ago * HOUR)
                    await store.settle(reservation.reservation_id, charged, now=now - hours_ago * HOUR + 1,
                                       usage=Usage(10, 2, charged))
                return key_id
            finally:
                await store.close()

        key_id = asyncio.run(fill())
        env = {"R1NEST_STORE": "dynamodb", "R1NEST_DYNAMODB_TABLE": "usage-cli", "R1NEST_AWS_REGION": REGION,
               "R1NEST_DYNAMODB_ENDPOINT_URL": endpoint}
        answer = json.loads(ok(invoke("--key", key_id, "--since", "24h", "--bucket", "hour", "--json",
                                      "--data-dir", str(tmp_path), env=env)))
    assert answer["totals"] == {"requests": 2, "prompt_tokens": 20, "cached_tokens": 4, "completion_tokens": 100,
                                "credits": 100}
    assert not (tmp_path / "ledger.sqlite3").exists()


def test_chart_columns_are_to_scale_and_never_hide_a_request() -> None:
    rows = column_chart([0, 1, 1000, 500], height=4)
    assert len(rows) == 4 and all(len(row) == 4 for row in rows)
    assert [row[0] for row in rows] == [" "] * 4  # nothing: blank
    assert [row[1] for row in rows] == [" ", " ", " ", "▁"]  # tiny but there
    assert [row[2] for row in rows] == ["█"] * 4  # the peak fills the height
    assert [row[3] for row in rows] == [" ", " ", "█", "█"]  # half
    assert column_chart([0, 0], height=2) == ["  ", "  "]


def test_squeeze_sums_runs_and_keeps_the_total() -> None:
    assert squeeze(list(range(10)), 4) == ([3, 12, 21, 9], 3)
    assert squeeze([5, 6], 80) == ([5, 6], 1)
    values = list(range(2000))
    columns, run = squeeze(values, 97)
    assert len(columns) <= 97 and sum(columns) == sum(values) and run == 21


# a gateway's admin API (--url) -----------------------------------------------------------------


@pytest.fixture(scope="module")
def gateway(ledger: Ledger) -> Iterator[str]:
    from r1nest.gateway.app import create_app
    from r1nest.gateway.upstream import UpstreamConfig
    from r1nest.settings import Settings
    from r1nest.testing.asgi_server import ServedApp

    settings = Settings(data_dir=ledger.data_dir)
    store = SqliteStore(settings.ledger_path)
    app = create_app(settings=settings, store=store,
                     upstream=UpstreamConfig(url="http://127.0.0.1:9", served_model="m"), admin_key=ADMIN_KEY)
    with ServedApp(app) as served:
        yield served.url
        served.call(store.close())


def remote(tmp_path: Path, url: str, *args: str, admin_key: str | None = ADMIN_KEY) -> Result:
    env = {"R1NEST_ADMIN_KEY": admin_key} if admin_key else {}
    return invoke(*args, "--url", url, "--data-dir", str(tmp_path / "client"), env=env)


def test_url_mode_gives_the_numbers_of_the_local_store(ledger: Ledger, gateway: str, tmp_path: Path) -> None:
    for args, key, since_s, bucket_s in (
        (["--since", "48h", "--bucket", "hour"], None, 48 * HOUR, HOUR),
        (["--key", ledger.key_ids["a"]], "a", 30 * DAY, DAY),
    ):
        answer = json.loads(ok(remote(tmp_path, gateway, *args, "--json")))
        assert numbers(answer) == expected(ledger, key=key, since_s=since_s, bucket_s=bucket_s)
        assert answer["key"] == (ledger.key_ids[key] if key else None)
    text = ok(remote(tmp_path, gateway, "--since", "48h", "--bucket", "hour"))
    assert "TOTAL" in text and "Credits per hour" in text
    assert not (tmp_path / "client" / "ledger.sqlite3").exists()  # --url never opened a local store


def test_url_mode_errors(ledger: Ledger, gateway: str, tmp_path: Path) -> None:
    unknown = remote(tmp_path, gateway, "--key", "000000000000")
    assert isinstance(unknown.exception, UnknownKey) and str(unknown.exception) == "no key with id 000000000000"
    wrong = remote(tmp_path, gateway, admin_key="r1nadmin-0e0e0e0e0e0e-" + "E" * 43)
    assert isinstance(wrong.exception, R1nestError) and "refused the admin key" in str(wrong.exception)
    missing = remote(tmp_path, gateway, admin_key=None)
    assert isinstance(missing.exception, ConfigError) and "R1NEST_ADMIN_KEY" in str(missing.exception)


def test_url_mode_refuses_an_answer_that_is_not_usage(tmp_path: Path) -> None:
    """A server that answers 200 with something else: a clear error, not a table of nonsense."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from r1nest.testing.asgi_server import ServedApp

    async def odd(request):
        return JSONResponse({"object": "usage", "bucket": "day", "from": 0, "to": 10, "data": [{"start": 0}]})

    with ServedApp(Starlette(routes=[Route("/admin/usage", odd)])) as served:
        result = remote(tmp_path, served.url)
    assert isinstance(result.exception, R1nestError)
    assert "not a usage object" in str(result.exception)
