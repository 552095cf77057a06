"""`r1nest usage`: requests, tokens and credits per hour or per day, as a table and a bar chart.

It reaches the ledger the way `r1nest keys` does (keys_cli.key_admin): the local store by
default, or a running gateway's `GET /admin/usage` with `--url` and the admin key. The window is
read here (r1nest.usage.parse_window, with this machine's clock), so `--since 7d` means the
same whichever way the numbers come, and a bad value is a usage error before anything is asked.

    r1nest usage                              # all keys, the last 30 days by UTC day
    r1nest usage --key 0123456789ab --since 24h --bucket hour
    r1nest usage --since 2026-11-01 --until 2026-12-01 --json
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import click

from r1nest.errors import BadRequest, R1nestError
from r1nest.keys_cli import check_key_id, key_admin, print_json, run_admin, where_options
from r1nest.ledger.base import UsageBucket
from r1nest.usage import BUCKETS, Window, filled, from_json, parse_window, totals

CHART_HEIGHT = 8  # rows of the bar chart
MIN_WIDTH, MAX_WIDTH = 60, 160  # columns the output is laid out for
MAX_COLUMN_WIDTH = 3  # characters per bar when there is room
DEFAULT_SINCE = {"hour": "24h", "day": "30d"}
CHART_METRICS = ("credits", "tokens", "requests")
_BLOCKS = " ▁▂▃▄▅▆▇█"  # eighths of a row
_FLAGS = {"from": "--since", "to": "--until", "bucket": "--bucket"}
_NUMBER_COLUMNS = (
    ("REQUESTS", "requests"), ("PROMPT", "prompt_tokens"), ("CACHED", "cached_tokens"),
    ("COMPLETION", "completion_tokens"), ("CREDITS", "credits"),
)


def metric_value(bucket: UsageBucket, metric: str) -> int:
    if metric == "tokens":
        return bucket.prompt_tokens + bucket.completion_tokens
    return int(getattr(bucket, metric))


def squeeze(values: list[int], width: int) -> tuple[list[int], int]:
    """`values` summed in runs of equal length so that at most `width` remain: (columns, run)."""
    run = max(1, -(-len(values) // max(1, width)))
    return [sum(values[i : i + run]) for i in range(0, len(values), run)], run


def column_chart(values: list[int], *, height: int = CHART_HEIGHT) -> list[str]:
    """A vertical bar chart in block characters, one column per value, top row first. Heights are
    to scale in eighths of a row; any value above zero shows at least one eighth."""
    top = max(values, default=0)
    if top <= 0:
        return [" " * len(values)] * height
    eighths = [0 if v <= 0 else max(1, round(v * height * 8 / top)) for v in values]
    rows = []
    for row in range(height - 1, -1, -1):
        rows.append("".join(_BLOCKS[min(8, max(0, e - row * 8))] for e in eighths))
    return rows


def bucket_label(start: float, bucket: str) -> str:
    return time.strftime("%Y-%m-%d %H:%M" if bucket == "hour" else "%Y-%m-%d", time.gmtime(start))


def print_usage(
    window: Window, buckets: list[UsageBucket], *, key_id: str | None, metric: str, width: int
) -> None:
    """The table of buckets with requests (and their totals), then the chart of every bucket."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=width, highlight=False, soft_wrap=False)
    who = f"key {key_id}" if key_id else "all keys"
    console.print(
        f"Usage of {who} by {window.bucket}, {bucket_label(window.since, 'hour')} to "
        f"{bucket_label(window.until, 'hour')} UTC"
    )
    if not buckets:
        console.print("No requests were settled in this window.")
        return
    sums = totals(buckets)
    table = Table(show_footer=True, box=None, pad_edge=False, header_style="bold", footer_style="bold")
    table.add_column(f"{window.bucket.upper()} (UTC)", footer="TOTAL", no_wrap=True)
    for title, field in _NUMBER_COLUMNS:
        table.add_column(title, footer=f"{getattr(sums, field):,}", justify="right", no_wrap=True)
    for b in buckets:
        numbers = (f"{getattr(b, field):,}" for _, field in _NUMBER_COLUMNS)
        table.add_row(bucket_label(b.start, window.bucket), *numbers)
    console.print(table)
    console.print()
    every = filled(window, buckets)
    axis = max(len(f"{metric_value(b, metric):,}") for b in every) + 1
    room = width - axis - 2
    columns, run = squeeze([metric_value(b, metric) for b in every], room)
    column_width = max(1, min(MAX_COLUMN_WIDTH, room // len(columns)))
    per = f"{run} {window.bucket}s" if run > 1 else window.bucket
    unit = "prompt + completion tokens" if metric == "tokens" else metric
    console.print(f"{unit.capitalize()} per {per}")
    peak = max(columns)
    for i, line in enumerate(column_chart(columns)):
        label = f"{peak:,}" if i == 0 else "0" if i == CHART_HEIGHT - 1 else ""
        bars = "".join(char * column_width for char in line)
        console.print(f"{label:>{axis}} │[cyan]{bars}[/cyan]")
    first, last = bucket_label(every[0].start, window.bucket), bucket_label(every[-1].start, window.bucket)
    span = len(columns) * column_width
    console.print(" " * (axis + 1) + "└" + "─" * span)
    dates = first + " " * (span - len(first) - len(last)) + last if span > len(first) + len(last) else first
    console.print(" " * (axis + 2) + dates)


@click.command()
@click.option(
    "--key", "key_id", metavar="ID", help="One key's usage (its id, see `r1nest keys list`); default: all keys."
)
@click.option(
    "--since", metavar="WHEN",
    help="Start: 24h, 7d, 30d (back from now), 2026-11-01, 2026-11-01T12:00:00Z or unix seconds. "
         "[default: 30d by day, 24h by hour]",
)
@click.option("--until", metavar="WHEN", help="End, in the same forms. [default: now]")
@click.option("--bucket", type=click.Choice(sorted(BUCKETS)), default="day", show_default=True,
              help="One row per hour or per UTC day.")
@click.option("--chart", "metric", type=click.Choice(CHART_METRICS), default="credits", show_default=True,
              help="What the bar chart shows.")
@click.option("--json", "as_json", is_flag=True, help="Print the usage object (as GET /admin/usage answers it).")
@where_options
def usage(
    key_id: str | None, since: str | None, until: str | None, bucket: str, metric: str, as_json: bool,
    data_dir: Path | None, url: str | None, admin_key: str | None,
) -> None:
    """Requests, tokens and credits per hour or day: a table, totals and a bar chart."""
    if key_id is not None:
        try:
            key_id = check_key_id(key_id)
        except click.BadParameter as exc:
            exc.param_hint = "--key"
            raise
    if since is None and until is None:
        since = DEFAULT_SINCE[bucket]
    try:
        window = parse_window(start=since, end=until, bucket=bucket, now=time.time())
    except BadRequest as exc:
        raise click.BadParameter(exc.message, param_hint=_FLAGS.get(exc.param or "", "--since")) from None
    answer = run_admin(key_admin(data_dir, url, admin_key), lambda a: a.usage(window, key_id=key_id))
    try:
        answered_window, buckets = from_json(answer)
    except ValueError as exc:
        raise R1nestError(f"the usage answer is not a usage object ({exc})") from None
    if as_json:
        print_json(answer)
        return
    width = max(MIN_WIDTH, min(shutil.get_terminal_size((100, 24)).columns, MAX_WIDTH))
    print_usage(answered_window, buckets, key_id=key_id, metric=metric, width=width)
