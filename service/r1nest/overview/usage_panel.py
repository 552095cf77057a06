"""The overview page's usage panel: the page's ApiKey over the last 24 hours and the last 30 days.

`read_usage_panel` asks the ledger (`Store.usage`) for two windows, the last 24 whole hours and
the last 30 whole UTC days, the current one included (r1nest.usage.recent_window). Only the
gateway has a ledger at hand when it serves /overview; a page rendered from Pulumi outputs or a
Modal app has no panel data and says where usage is shown instead.

`usage_chart` draws one window as an inline SVG bar chart, rendered here on the server: no
script, no chart library, nothing fetched, so it works under the page's strict CSP and in the
standalone file. One <rect class="bar"> per bucket with requests (its height to scale in
credits; a bucket with requests never shows as empty), each with a <title> that names its
numbers; the SVG is role="img" with a <title> and <desc>, and the page repeats the totals as text.
Colours come from the stylesheet (classes, no inline style), so dark mode applies.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from markupsafe import Markup, escape

from r1nest.errors import StoreError
from r1nest.ledger.base import Store, UsageBucket
from r1nest.usage import Totals, Window, filled, recent_window, totals

log = logging.getLogger("r1nest.overview.usage")

HOURS_SHOWN = 24
DAYS_SHOWN = 30
CHART_HEIGHT = 100  # SVG units; the stylesheet sets the height on screen
PEAK_HEIGHT = 96  # the tallest bar, a little below the top
SLOT_WIDTH = 10  # SVG units per bucket: a bar and the gap after it
BAR_WIDTH = 7
MIN_BAR_HEIGHT = 3  # a bucket with requests but few credits still shows


@dataclass(frozen=True, slots=True)
class Series:
    """Every bucket of a window, oldest first, zeros where nothing was settled."""

    window: Window
    buckets: tuple[UsageBucket, ...]

    @property
    def totals(self) -> Totals:
        return totals(self.buckets)

    @property
    def with_requests(self) -> tuple[UsageBucket, ...]:
        return tuple(b for b in self.buckets if b.requests > 0)

    @property
    def peak(self) -> UsageBucket | None:
        """The bucket with the most credits (the earliest of equals), None when all are empty."""
        busy = self.with_requests
        return max(busy, key=lambda b: (b.credits, -b.start)) if busy else None


@dataclass(frozen=True, slots=True)
class UsagePanel:
    key_id: str | None
    hourly: Series | None = None  # the last 24 hours, by hour
    daily: Series | None = None  # the last 30 days, by UTC day
    note: str = ""  # why there are no series

    @property
    def available(self) -> bool:
        return self.hourly is not None and self.daily is not None


async def read_usage_panel(store: Store, key_id: str, *, now: float | None = None) -> UsagePanel:
    """The key's last 24 hours and 30 days from the ledger. A ledger that cannot answer gives a
    panel with a note, not a failed page."""
    now = time.time() if now is None else now
    series = []
    for bucket, count in (("hour", HOURS_SHOWN), ("day", DAYS_SHOWN)):
        window = recent_window(bucket, count, now=now)
        try:
            buckets = await store.usage(
                key_id=key_id, since=window.since, until=window.until, bucket_s=window.bucket_s
            )
        except StoreError as exc:
            log.warning("overview: the ledger did not answer the usage query: %s", exc)
            return UsagePanel(key_id, note="The ledger could not be read just now; reload the page to try again.")
        series.append(Series(window, tuple(filled(window, buckets))))
    return UsagePanel(key_id, hourly=series[0], daily=series[1])


# -- text --------------------------------------------------------------------------------------------


def bucket_label(start: float, bucket: str) -> str:
    """`Nov 30 14:00` for an hour, `Nov 30` for a day (UTC)."""
    return time.strftime("%b %d %H:%M" if bucket == "hour" else "%b %d", time.gmtime(start))


def bucket_text(b: UsageBucket, bucket: str) -> str:
    """One bucket's numbers in words (a bar's tooltip)."""
    when = time.strftime("%Y-%m-%d %H:%M UTC" if bucket == "hour" else "%Y-%m-%d (UTC day)", time.gmtime(b.start))
    return (
        f"{when}: {b.credits:,} credits, {b.requests:,} {_plural(b.requests, 'request')}, "
        f"{b.prompt_tokens:,} prompt tokens ({b.cached_tokens:,} cached), "
        f"{b.completion_tokens:,} completion tokens"
    )


def summary_text(series: Series) -> str:
    """The chart's description: totals and the busiest bucket."""
    t = series.totals
    if t.requests == 0:
        return "No requests in this period."
    peak = series.peak
    assert peak is not None
    when = bucket_label(peak.start, series.window.bucket)
    busiest = f"the busiest {series.window.bucket} was {when} UTC with {peak.credits:,} credits"
    return f"{t.credits:,} credits in {t.requests:,} {_plural(t.requests, 'request')}; {busiest}."


def _plural(count: int, word: str) -> str:
    return word if count == 1 else word + "s"


# -- the chart ---------------------------------------------------------------------------------------


def usage_chart(series: Series, *, chart_id: str, title: str) -> Markup:
    """The SVG bar chart of `series` (credits per bucket)."""
    buckets = series.buckets
    width = max(1, len(buckets)) * SLOT_WIDTH
    top = max((b.credits for b in buckets), default=0)
    svg_id = escape(chart_id)
    parts = [
        f'<svg class="bars" id="{svg_id}" viewBox="0 0 {width} {CHART_HEIGHT}" preserveAspectRatio="none" '
        f'role="img" aria-labelledby="{svg_id}-title {svg_id}-desc" focusable="false">',
        f'<title id="{svg_id}-title">{escape(title)}</title>',
        f'<desc id="{svg_id}-desc">{escape(summary_text(series))}</desc>',
        f'<rect class="plot" x="0" y="0" width="{width}" height="{CHART_HEIGHT}"/>',
    ]
    for index, b in enumerate(buckets):
        if b.requests <= 0:
            continue
        height = MIN_BAR_HEIGHT if top <= 0 else max(MIN_BAR_HEIGHT, round(b.credits * PEAK_HEIGHT / top, 2))
        x = index * SLOT_WIDTH + (SLOT_WIDTH - BAR_WIDTH) / 2
        parts.append(
            f'<rect class="bar" x="{x:g}" y="{CHART_HEIGHT - height:g}" width="{BAR_WIDTH}" height="{height:g}" '
            f'data-start="{b.start:.0f}" data-credits="{b.credits}">'
            f"<title>{escape(bucket_text(b, series.window.bucket))}</title></rect>"
        )
    parts.append(f'<rect class="baseline" x="0" y="{CHART_HEIGHT - 1}" width="{width}" height="1"/>')
    parts.append("</svg>")
    return Markup("".join(parts))
