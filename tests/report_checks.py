"""Checks shared by the report tests: a number shown on report.html against the one in stats.json.

Every element of the page that shows a number carries `data-stat`, the JSON path of that number in
stats.json; `check_shown` reads the text back as a person would (thousands separators, percentages,
rounding to the digits shown) and compares it with the value the path names.
"""
import html.parser
import json
import math
import re

_NUMBER = re.compile(r"^-?[\d,]+(\.\d+)?%?$")


def stat_at(stats: dict, path: list):
    """The value at a JSON path (keys and list indices) in the statistics."""
    value = stats
    for step in path:
        value = value[step]
    return value


def shown_value(text: str) -> tuple[float, float]:
    """('89.6%' -> (0.896, 0.0005)): the number a person reads and half a unit of its last digit."""
    text = text.strip()
    assert _NUMBER.match(text), f"not a number as the page shows them: {text!r}"
    percent = text.endswith("%")
    digits = text.rstrip("%").replace(",", "")
    decimals = len(digits.split(".", 1)[1]) if "." in digits else 0
    scale = 100.0 if percent else 1.0
    return float(digits) / scale, 0.5 * 10.0 ** -decimals / scale


def check_shown(text: str, value, where: str = "") -> None:
    """Assert that `text` shows `value` (None or NaN as 'n/a' or 'none'; a list of gaps joined by ',
    ')."""
    text = " ".join(text.split())
    if value is None or (isinstance(value, float) and math.isnan(value)):
        assert text in ("n/a", "none"), f"{where}: {text!r} shown for a missing value"
        return
    if isinstance(value, list):
        parts = text.split(", ")
        assert len(parts) == len(value), f"{where}: {text!r} for {value!r}"
        for part, item in zip(parts, value):
            check_shown(part, item, where)
        return
    number, tolerance = shown_value(text)
    assert abs(number - float(value)) <= tolerance + 1e-9, (
        f"{where}: page shows {text!r}, stats.json has {value!r}"
    )


class _StatCollector(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.found, self._open = [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "data-stat" in attrs:
            self._open = [attrs["data-stat"], ""]

    def handle_data(self, data):
        if self._open is not None:
            self._open[1] += data

    def handle_endtag(self, tag):
        if self._open is not None:
            self.found.append((json.loads(self._open[0]), self._open[1].strip()))
            self._open = None


def shown_stats(page: str) -> list[tuple[list, str]]:
    """(path, text) of every element of a rendered page that carries data-stat (none has children).
    """
    collector = _StatCollector()
    collector.feed(page)
    return collector.found


def check_page_against_stats(shown: list[tuple[list, str]], stats: dict) -> int:
    """check_shown for every (path, text) pair; returns how many were checked."""
    for path, text in shown:
        check_shown(text, stat_at(stats, path), where=json.dumps(path))
    return len(shown)
