"""The report: what balancing changed, as statistics JSON, a self-contained HTML page and a dataset
card.

Reads the counted signatures (before), the solution (planned), the release's kept signatures and
manifest (what was actually written) and the quarantine files; no Beam pipeline is needed, the
inputs are small. The numbers are built in report_stats (stats.json; its per-concept rows in
report_concepts), the page in report_page (report.html, from templates/), the card in report_card
(README.md), the plots in report_plots.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from apache_beam.io.filesystems import FileSystems

from pipeline.balance import SIGNATURES_FILE
from pipeline.files import read_text, write_json_atomically, write_text_atomically
from pipeline.publish import MANIFEST_FILE
from pipeline.report_card import code, dataset_card, markdown_text  # noqa: F401  (the report's API)
from pipeline.report_page import render_html
from pipeline.report_concepts import HEATMAP_MAX_CONCEPTS  # noqa: F401
from pipeline.report_plots import (plain_text, plot_heatmaps, plot_price_of_balance,  # noqa: F401
                                   plot_proxies, plot_q)
from pipeline.report_stats import (LOW_COVERAGE, PERCEIVED, build_statistics,  # noqa: F401
                                   coverage_rows, coverage_warnings, headline, kept_records, number,
                                   quarantine_entries, read_jsonl, release_summary)
from solvers.solution import BalanceSolution

log = logging.getLogger(__name__)

STATS_FILE = "stats.json"
REPORT_FILE = "report.html"
CARD_FILE = "README.md"
# Where the quarantine files are: annotate's beside its annotations, resample's in the release.
ANNOTATE_QUARANTINE = "quarantine-*.jsonl"
RESAMPLE_QUARANTINE = "quarantine/resample-*.jsonl"


def report(solution_path: str, signatures_path: str, release_dir: str,
           annotations_dir: str | None = None, output_dir: str | None = None) -> dict:
    """Write stats.json, report.html and README.md; return the statistics.

    annotations_dir (optional): annotate's output, for its counts and quarantine files.
    """
    output_dir = output_dir or release_dir
    solution = BalanceSolution.from_json(read_text(solution_path))
    manifest = json.loads(read_text(FileSystems.join(release_dir, MANIFEST_FILE)))
    annotate_counts = None
    quarantine = {
        "resample": quarantine_entries(FileSystems.join(release_dir, RESAMPLE_QUARANTINE))
    }
    if annotations_dir:
        if FileSystems.exists(FileSystems.join(annotations_dir, "counts.json")):
            annotate_counts = json.loads(read_text(FileSystems.join(annotations_dir,
                                                                    "counts.json")))
        quarantine = {
            "annotate": quarantine_entries(FileSystems.join(annotations_dir, ANNOTATE_QUARANTINE)),
            **quarantine
        }
    stats = build_statistics(solution, read_jsonl(signatures_path), kept_records(release_dir),
                             manifest, annotate_counts, quarantine)
    write_json_atomically(FileSystems.join(output_dir, STATS_FILE), stats, indent=1)
    write_text_atomically(FileSystems.join(output_dir, REPORT_FILE), render_html(stats))
    write_text_atomically(FileSystems.join(output_dir, CARD_FILE),
                          dataset_card(stats, manifest, solution))
    for warning in coverage_warnings(stats):
        log.warning("%s", warning)
    head = headline(stats)
    log.info("data AB max %s before, %s in the release; report in %s",
             number(head["before"]["association_bias_max"]),
             number(head["realized"]["association_bias_max"]),
             FileSystems.join(output_dir, REPORT_FILE))
    return stats


def run(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="balancebeam report", description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  balancebeam report --solution out/solution.json --release out/release \\\n"
               "      --annotations out/annotations\n")
    parser.add_argument("--solution", required=True,
                        help="solution.json from `balancebeam balance`")
    parser.add_argument("--signatures",
                        help=f"{SIGNATURES_FILE} from balance (default: next to --solution)")
    parser.add_argument("--release", required=True,
                        help="release directory from `balancebeam resample`")
    parser.add_argument("--annotations",
                        help="annotate output directory (for its quarantine counts and files)")
    parser.add_argument(
        "--output", help="where to write stats.json, report.html, README.md (default: --release)")
    args = parser.parse_args(argv)
    signatures = args.signatures or FileSystems.join(
        args.solution.rsplit("/", 1)[0] if "/" in args.solution else ".", SIGNATURES_FILE)
    try:
        report(args.solution, signatures, args.release, args.annotations, args.output)
    except (ValueError, FileNotFoundError) as error:
        print(f"balancebeam report: {error}", file=sys.stderr)
        return 1
    return 0
