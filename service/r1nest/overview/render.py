"""Turns an OverviewContext into the overview page's HTML. Pure: no I/O beyond reading templates.

Two forms of the same page:
- served (the gateway's /overview): CSS and JS are separate files under `static_url`, so the page
  works under a Content-Security-Policy without 'unsafe-inline' (the page has no inline script);
- standalone (`r1nest overview --out FILE`): CSS and JS are inlined, so the file works offline and
  from file://, where no CSP applies and there is no server to fetch assets from.

The API key sits in the page in full (copy and reveal need it) but is shown masked: each place it
appears is a pair of spans, `.key-mask` (shown) and `.key-value` (hidden until revealed).
"""

from __future__ import annotations

from functools import lru_cache
import jinja2
from markupsafe import Markup, escape

from r1nest.overview.context import OverviewContext, mask_key
from r1nest.overview.examples import Example, build_examples
from r1nest.overview.usage_panel import bucket_label, bucket_text, summary_text, usage_chart
from r1nest.paths import TEMPLATES_DIR

STATIC_DIR = TEMPLATES_DIR / "static"
STATIC_FILES: dict[str, str] = {"overview.css": "text/css", "overview.js": "text/javascript"}


@lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=False,
        lstrip_blocks=False,
    )
    env.globals["key_slot"] = _key_slot
    env.globals["segments"] = _segments
    env.globals["usage_chart"] = usage_chart
    env.globals["bucket_label"] = bucket_label
    env.globals["bucket_text"] = bucket_text
    env.globals["summary_text"] = summary_text
    return env


def _key_markup(key: str, masked: str) -> Markup:
    return Markup('<span class="key-mask" aria-label="API key, hidden">{}</span><span class="key-value">{}</span>').format(
        masked, key
    )


def _key_slot(ctx: OverviewContext) -> Markup:
    assert ctx.api_key is not None
    return _key_markup(ctx.api_key, ctx.masked_key)


def _segments(example: Example) -> Markup:
    parts: list[str] = []
    for segment in example.segments:
        if segment.is_key:
            parts.append(_key_markup(segment.text, mask_key(segment.text)))
        else:
            parts.append(str(escape(segment.text)))
    return Markup("".join(parts))


def static_asset(name: str) -> str:
    """The text of one of the page's own assets (KeyError for any other name)."""
    if name not in STATIC_FILES:
        raise KeyError(name)
    return (STATIC_DIR / name).read_text(encoding="utf-8")


def render_overview(
    ctx: OverviewContext,
    *,
    standalone: bool = False,
    static_url: str = "/overview/static",
    logout_url: str | None = None,
    csrf_token: str | None = None,
    health_url: str | None = None,
) -> str:
    """The page's HTML. `logout_url` + `csrf_token` add the logout form (served page only)."""
    if logout_url is not None and not csrf_token:
        raise ValueError("a logout form needs a CSRF token")
    template = _environment().get_template("overview.html.j2")
    inline_css = inline_js = ""
    if standalone:
        inline_css = static_asset("overview.css")
        inline_js = static_asset("overview.js")
        # the assets are ours, but a stray closing tag would end the element early
        if "</style" in inline_css.lower() or "</script" in inline_js.lower():
            raise ValueError("static assets must not contain closing style/script tags")
    return template.render(
        ctx=ctx,
        examples=build_examples(ctx),
        standalone=standalone,
        static_url=static_url,
        logout_url=None if standalone else logout_url,
        csrf_token=csrf_token or "",
        health_url=None if standalone else health_url,
        inline_css=inline_css,
        inline_js=inline_js,
    )


def render_login(*, action: str = "/overview/login", error: str = "", static_url: str = "/overview/static") -> str:
    template = _environment().get_template("login.html.j2")
    return template.render(action=action, error=error, static_url=static_url)
