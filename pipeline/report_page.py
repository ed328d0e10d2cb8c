"""report.html: one self-contained page (inline CSS, script and PNG plots; nothing from the
network), rendered from stats.json with Jinja2 and autoescaping.

Every number the page shows comes from the statistics dict; the elements that show one carry
`data-stat`, the JSON path of that number in stats.json, so a reader (or a test) can check the
page against the file. The per-concept table sorts and filters in the page with a small inline
script; without it the table is still complete.
"""
from __future__ import annotations

import math
import re

import jinja2
import markupsafe

from pipeline.report_plots import plot_heatmaps, plot_price_of_balance, plot_proxies, plot_q
from pipeline.report_concepts import CONSTRAINED, DROPPED, EXEMPT, LOW_SUPPORT, PROXY, STAGES
from pipeline.report_stats import coverage_warnings, number, percent

TEMPLATE = "report.html"

# The status legend above the concept table, in the order of the status filter.
STATUS_WORDS = {
    CONSTRAINED: ("constrained",
                  "every value's share is held within the association gap of its target"),
    PROXY: (
        "proxy",
        "a concept beyond the labels of interest that is common and skewed, constrained like them"),
    DROPPED: ("dropped by the plan",
              "the gap could only be met by keeping none of its annotated rows"),
    LOW_SUPPORT: (
        "low support",
        "too few annotated rows to balance: left out of the constraints and the AB summary"),
    EXEMPT: (
        "exempt",
        "left unconstrained on purpose (--unconstrained-concepts): its association is definitional"
    ),
}
STAGE_WORDS = {"before": "before", "planned": "planned", "realized": "released"}


def count(value) -> str:
    """A number of rows for people: '25,014' (one decimal where weights make it fractional), or
    'n/a'."""
    if value is None or not math.isfinite(value):
        return "n/a"
    if abs(value - round(value)) < 1e-9:
        return f"{round(value):,}"
    return f"{value:,.1f}"


def short(value: str) -> str:
    """'perceived_gender:woman' -> 'woman'."""
    return str(value).split(":", 1)[-1]


def sort_key(value) -> str:
    """A cell's data-sort attribute: the full-precision number, or '' where there is none."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return repr(float(value))


def _environment() -> jinja2.Environment:
    environment = jinja2.Environment(loader=jinja2.PackageLoader("pipeline", "templates"),
                                     autoescape=True, undefined=jinja2.StrictUndefined,
                                     trim_blocks=True, lstrip_blocks=True,
                                     keep_trailing_newline=True)
    environment.filters.update(num=number, pct=percent, count=count, short=short, sort_key=sort_key,
                               code_spans=code_spans)
    return environment


def _over_gap(row: dict, stats: dict) -> dict:
    """{stage: True} where the plan or the release leaves a constrained concept's largest
    |share - target| above the association gap (before balancing, being off the gap is what
    balancing is for)."""
    gap = stats["gaps"]["association"]
    over = {stage: False for stage in STAGES}
    if row["status"] in (CONSTRAINED, PROXY) and isinstance(gap, (int, float)):
        over.update({stage: row["gap"][stage] is not None and row["gap"][stage] > gap + 1e-9
                     for stage in ("planned", "realized")})
    return over


def code_spans(text: str) -> markupsafe.Markup:
    """Text whose `backticked` parts are shown as code (the rest escaped, as everywhere on the
    page)."""
    return markupsafe.Markup(re.sub(r"`([^`]+)`", r"<code>\1</code>", str(markupsafe.escape(text))))


def render_html(stats: dict) -> str:
    """The report page of one release, from its statistics alone (stats.json)."""
    concepts = stats.get("concepts", [])
    statuses = [
        status for status in STATUS_WORDS if any(row["status"] == status for row in concepts)
    ]
    context = {
        "stats": stats,
        "stages": STAGES,
        "stage_words": STAGE_WORDS,
        "values": list(stats["targets"]),
        "groups": list(stats["annotation_coverage"]["before"]),
        "warnings": coverage_warnings(stats),
        "concepts": [(index, row, _over_gap(row, stats)) for index, row in enumerate(concepts)],
        "statuses": [(status, *STATUS_WORDS[status]) for status in statuses],
        "status_words": {status: word for status, (word, _) in STATUS_WORDS.items()},
        "heatmap": plot_heatmaps(stats),
        "q_plot": plot_q(stats),
        "price_plot": plot_price_of_balance(stats),
        "proxy_plot": plot_proxies(stats),
        "gap_is_number": isinstance(stats["gaps"]["association"], (int, float)),
    }
    return _environment().get_template(TEMPLATE).render(**context)
