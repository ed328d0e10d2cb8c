"""report.html in a real browser: headless Chromium (Debian's, at /usr/bin/chromium) driven by
Playwright.

The report of the real COCO val2017 captions release is opened from disk (file://), its per-concept
table sorted and filtered by clicking and typing, every number it shows checked against stats.json
and the headline and per-concept realized shares against the release's own files (its captions
annotated again here); no console error and no request besides the page itself. Screenshots go to
test-artifacts/ at the repository root. Skips only where no Chromium is installed (`.ci/run`
installs it, so CI runs these).
"""
import collections
import json
import os
import pathlib
import shutil
import tarfile

import numpy as np
import pytest
from report_checks import check_page_against_stats, check_shown

from pipeline import cli
from pipeline.annotators.text import annotate_caption
from pipeline.signatures import encode
from solvers import data_bias
from solvers.solution import BalanceSolution

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = pathlib.Path(__file__).resolve().parents[1] / "test-artifacts"
TWO_WORKERS = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]
COCO_RECORDS = 25014


def _chromium() -> str:
    found = shutil.which("chromium") or CHROMIUM
    if not os.path.exists(found):
        pytest.skip(
            f"no Chromium to test report.html in (looked for `chromium` on PATH and {CHROMIUM}); "
            "install it with `apt-get install -y chromium` (.ci/run does)")
    return found


@pytest.fixture(scope="module")
def coco_release(shared_data, tmp_path_factory):
    """`balancebeam run` on the real COCO val2017 captions at the largest feasible keep rate, 5%
    gap."""
    _chromium()  # no browser: skip before spending a minute on the release
    output = tmp_path_factory.mktemp("coco_report")
    assert cli.main([
        "run", "--input", str(shared_data / "coco_val2017_captions.json"), "--output", str(output),
        "--keep-rate", "max", "--association-gap", "0.05", *TWO_WORKERS
    ]) == 0
    return output


@pytest.fixture(scope="module")
def quarantine_release(tmp_path_factory):
    """A caption table with three empty captions and a line that is not JSON, run end to end."""
    _chromium()
    work = tmp_path_factory.mktemp("quarantine_report")
    lines = [
        json.dumps({"key": f"k{i:02d}", "caption": "a man cooking" if i % 2 else "a woman cooking"})
        for i in range(60)
    ]
    lines += [json.dumps({"key": f"empty{i}", "caption": "   "}) for i in range(3)] + ["{not json"]
    table = work / "captions.jsonl"
    table.write_text("\n".join(lines) + "\n")
    output = work / "run"
    assert cli.main(["run", "--input", str(table), "--output", str(output), "--keep-rate", "0.8",
                     "--min-support", "1"]) == 0
    return output


@pytest.fixture(scope="module")
def browser(coco_release, quarantine_release):
    """Chromium, launched after the Beam jobs of the releases have run."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=_chromium(), headless=True,
                                              args=CHROMIUM_ARGS)
        yield launched
        launched.close()


class Report:
    """An opened report.html, with the console errors and requests it caused."""

    def __init__(self, browser, release: pathlib.Path):
        self.url = (release / "report.html").as_uri()
        self.stats = json.loads((release / "stats.json").read_text())
        self.errors, self.requests = [], []
        self.page = browser.new_page(viewport={"width": 1280, "height": 900})
        self.page.on(
            "console", lambda message: self.errors.append(f"console {message.type}: {message.text}")
            if message.type == "error" else None)
        self.page.on("pageerror", lambda error: self.errors.append(f"uncaught: {error}"))
        self.page.on("requestfailed",
                     lambda request: self.errors.append(f"request failed: {request.url}"))
        self.page.on("request", lambda request: self.requests.append(request.url))
        self.page.goto(self.url)
        self.page.wait_for_load_state("load")

    def shown(self, selector="[data-stat]"):
        """(path, text) of the visible elements carrying data-stat."""
        pairs = self.page.eval_on_selector_all(
            selector, "els => els.filter(e => e.offsetParent !== null || e.getClientRects().length)"
                      ".map(e => [e.getAttribute('data-stat'), e.textContent])")
        return [(json.loads(path), text) for path, text in pairs]

    def text(self, path: list) -> str:
        return self.page.locator(f"[data-stat='{json.dumps(path)}']").first.inner_text()

    def rows(self, visible_only=True):
        """The per-concept table's rows in page order: (concept, status, index into stats.json's
        concepts)."""
        script = ("(rows, visible) => rows.filter(r => !visible || !r.hidden)"
                  ".map(r => [r.dataset.concept, r.dataset.status, Number(r.dataset.index)])")
        return [tuple(row) for row in self.page.eval_on_selector_all("#concepts tbody tr", script,
                                                                     visible_only)]

    def close(self):
        assert self.errors == [], self.errors
        assert all(url == self.url or url.startswith("data:")
                   for url in self.requests), self.requests
        self.page.close()


def _release_captions(release: pathlib.Path) -> dict:
    """{key: caption} of every sample in the release's tars, read with tarfile."""
    captions = {}
    for shard in sorted(release.glob("*.tar")):
        with tarfile.open(shard) as archive:
            for member in archive.getmembers():
                key, extension = member.name.split(".", 1)
                if extension == "txt":
                    captions[key] = archive.extractfile(member).read().decode("utf-8")
    return captions


def test_the_coco_report_shows_the_numbers_of_stats_json_and_of_the_release(coco_release, browser):
    release = coco_release / "release"
    report = Report(browser, release)
    stats, page = report.stats, report.page
    assert page.title() == "balancebeam release report"
    checked = check_page_against_stats(report.shown(), stats)
    # the headline, coverage, curve and the 11 numbers of every concept row
    assert checked >= 11 * 40
    # Independently of stats.json: the input, the release's files and the solution.
    solution = BalanceSolution.from_json((coco_release / "solution.json").read_text())
    captions = _release_captions(release)
    assert report.text(["rows", "input_records"]) == f"{COCO_RECORDS:,}"
    assert report.text(["rows", "kept"]) == f"{len(captions):,}"
    check_shown(report.text(["max_keep_rate"]), solution.statistics["max_keep_rate"])
    check_shown(report.text(["keep_rate"]), solution.keep_rate)
    assert solution.certificate() in page.inner_text("#certificate")
    assert "every constrained value is within its gap" in page.inner_text("#certificate")
    spec = solution.spec
    annotated = [annotate_caption(text) for text in captions.values()]
    realized = data_bias(encode([a for a, _, _ in annotated], spec.attribute_names),
                         encode([c for _, c, _ in annotated], spec.concept_names),
                         weights=np.ones(len(annotated)),
                         targets=np.asarray(spec.targets), groups=spec.groups,
                         min_support=stats["min_support"], attribute_names=spec.attribute_names,
                         concept_names=spec.concept_names, group_names=spec.group_names)
    check_shown(report.text(["data_bias", "realized", "summary", "representation_bias"]),
                realized.representation_bias)
    check_shown(report.text(["data_bias", "realized", "summary", "association_bias_max"]),
                realized.association_bias_max)
    assert float(report.text(["data_bias", "before", "summary", "association_bias_max"])) > 0.2
    # Each constrained concept's released share of each value, counted from the captions here.
    with_gender = [(set(a), set(c)) for a, c, _ in annotated if a]
    constrained = [(name, index) for name, status, index in report.rows()
                   if status in ("constrained", "proxy")]
    assert len(constrained) >= 40
    for name, index in constrained:
        rows = [attributes for attributes, concepts in with_gender if name in concepts]
        for value in spec.attribute_names:
            share = sum(value in attributes for attributes in rows) / len(rows) if rows else None
            check_shown(report.text(["concepts", index, "shares", "realized", value]), share,
                        f"{name} {value}")
            if share is not None:
                target = spec.targets[spec.attribute_names.index(value)]
                assert abs(share - target) <= 0.05 + 1e-12, name
        assert report.text(["concepts", index, "rows", "realized"]) == f"{len(rows):,}"
    heatmap = page.locator("#heatmap img")
    assert heatmap.evaluate("img => img.complete && img.naturalWidth > 0")
    assert page.locator("#price-table tbody tr").count() == len(stats["price_of_balance"]) >= 5
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
    page.screenshot(path=str(ARTIFACTS / "report-top.png"))
    assert (ARTIFACTS / "report.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    report.close()


def _cells(report: Report, index: int, path: list) -> object:
    value = report.stats["concepts"][index]
    for step in path:
        value = value[step]
    return value


def _expected_order(rows, key, descending):
    """The page's sort: by key (None last whatever the direction), ties in the page's first order.
    """
    present = [row for row in rows if key(row) is not None]
    missing = [row for row in rows if key(row) is None]
    present.sort(key=lambda row: (-key(row) if descending else key(row), row[2]))
    return present + sorted(missing, key=lambda row: row[2])


def test_the_coco_concept_table_sorts_and_filters_in_the_page(coco_release, browser):
    report = Report(browser, coco_release / "release")
    page, stats = report.page, report.stats
    first = report.rows()
    # support order, as in the file
    assert [index for _, _, index in first] == list(range(len(stats["concepts"])))
    assert page.inner_text("#concepts-shown") == f"{len(first)} of {len(first)}"

    def click(column):
        page.click(f"#concepts thead th[data-col='{column}'] button")
        return page.get_attribute(f"#concepts thead th[data-col='{column}']", "aria-sort")

    assert click(0) == "ascending"  # the concept's name
    assert report.rows() == sorted(first, key=lambda row: (row[0].lower(), row[2]))
    support = lambda row: _cells(report, row[2], ["support", "perceived_gender"])  # noqa: E731
    assert click(2) == "descending"
    assert report.rows() == _expected_order(first, support, descending=True)
    assert click(2) == "ascending"
    assert report.rows() == _expected_order(first, support, descending=False)
    released_gap_column = page.get_attribute("#concepts thead tr:nth-child(2) th:last-child",
                                             "data-col")
    gap = lambda row: _cells(report, row[2], ["gap", "realized"])  # noqa: E731
    assert click(released_gap_column) == "descending"
    by_gap = report.rows()
    assert by_gap == _expected_order(first, gap, descending=True)
    assert gap(by_gap[0]) >= gap(by_gap[1])
    # whole rows moved together
    check_page_against_stats(report.shown("#concepts [data-stat]"), stats)

    # Filter by a piece of a name, then by status; the count says what is shown.
    piece = stats["concepts"][0]["concept"][:2].lower()
    page.fill("#concept-filter", piece)
    expected = [row for row in by_gap if piece in row[0].lower()]
    assert report.rows() == expected and 0 < len(expected) < len(first)
    assert page.inner_text("#concepts-shown") == f"{len(expected)} of {len(first)}"
    page.fill("#concept-filter", "")
    counts = collections.Counter(row["status"] for row in stats["concepts"])
    for status in counts:
        page.select_option("#status-filter", status)
        assert [row[1] for row in report.rows()] == [status] * counts[status]
        assert page.inner_text("#concepts-shown") == f"{counts[status]} of {len(first)}"
    page.select_option("#status-filter", "constrained")
    page.fill("#concept-filter", piece)
    both = [row for row in by_gap if piece in row[0].lower() and row[1] == "constrained"]
    assert report.rows() == both
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "report-filtered.png"))
    page.select_option("#status-filter", "all")
    page.fill("#concept-filter", "")
    assert len(report.rows()) == len(first)
    report.close()


def _quarantine_files(pattern_dir: pathlib.Path, pattern: str) -> list[dict]:
    return [json.loads(line) for path in sorted(pattern_dir.glob(pattern))
            for line in path.read_text().splitlines() if line.strip()]


def test_quarantined_records_are_shown_by_stage_and_reason_with_examples(
        quarantine_release, browser):
    report = Report(browser, quarantine_release / "release")
    page = report.page
    assert report.text(["rows", "input_records"]) == "64" and report.text(["rows", "quarantined"
                                                                           ]) == "4"
    check_page_against_stats(report.shown(), report.stats)
    files = {
        "annotate": _quarantine_files(quarantine_release / "annotations", "quarantine-*.jsonl"),
        "resample": _quarantine_files(quarantine_release / "release" / "quarantine",
                                      "resample-*.jsonl")
    }
    assert len(files["annotate"]) == 4 and len(files["resample"]) == 4
    expected = collections.Counter(
        (job, e["stage"], e["reason"]) for job, entries in files.items() for e in entries)
    shown = page.eval_on_selector_all(
        "#quarantine-table tbody tr", "rows => rows.map(r => Array.from(r.cells)"
        ".map(c => c.innerText.trim()))")
    assert {(job, stage, reason): int(count) for job, stage, reason, count, _ in shown} == expected
    for job, stage, reason, count, examples in shown:
        keys = sorted(
            str(e["key"]) for e in files[job]
            if (e["stage"], e["reason"]) == (stage, reason) and e["key"] is not None)
        listed = examples.split("\n")
        assert len(listed) == min(int(count), 5)
        if keys:
            assert set(listed) <= set(keys), (reason, listed, keys)
        else:  # a record without a key is shown by its file
            assert all(item.startswith("captions.jsonl") for item in listed)
    assert ("resample", "resample", "not_annotated") in expected and (
        "resample",
        "read",
        "bad_json",
    ) in expected
    report.close()
