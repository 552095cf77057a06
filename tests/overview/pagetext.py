"""Reading the overview page's HTML the way a user reads it (without a browser)."""

from __future__ import annotations

from html.parser import HTMLParser


class PageText(HTMLParser):
    """Texts of <pre data-example> blocks as shown once the key is revealed (the .key-mask
    spans dropped), plus every <script> element's attributes and inline text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.examples: dict[str, str] = {}
        self.scripts: list[tuple[dict, str]] = []
        self._current: str | None = None
        self._skip_depth = 0
        self._depth = 0
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "script":
            self._in_script = True
            self.scripts.append((attrs, ""))
        if tag == "pre" and "data-example" in attrs:
            self._current = attrs["data-example"]
            self.examples[self._current] = ""
        if self._current is not None and tag == "span":
            self._depth += 1
            if "key-mask" in (attrs.get("class") or "").split() and not self._skip_depth:
                self._skip_depth = self._depth

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False
        if tag == "pre":
            self._current = None
        if self._current is not None and tag == "span":
            if self._skip_depth == self._depth:
                self._skip_depth = 0
            self._depth -= 1

    def handle_data(self, data):
        if self._in_script:
            attrs, text = self.scripts[-1]
            self.scripts[-1] = (attrs, text + data)
        if self._current is not None and not self._skip_depth:
            self.examples[self._current] += data


def extract(html: str) -> PageText:
    parser = PageText()
    parser.feed(html)
    parser.close()
    return parser
