"""The balance job: count constraint signatures of the annotations (Beam), solve M4 on them in
memory.

Writes solution.json (the duals every resample worker applies, plus readable statistics) and
signatures.jsonl (the counted signatures the report reads).
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import os
from typing import Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from pipeline.coders import Batch
from pipeline.errors import ReconciliationError, UsageError
from pipeline.files import read_text, write_text_atomically
from pipeline.options import pipeline_options
from pipeline.quarantine import METRICS_NAMESPACE
from pipeline.plan import (DEFAULT_METHOD, BalanceConfig, build_problem, price_of_balance,
                           solve_table)
from pipeline.signatures import SignatureTable, row_signature
from solvers.problem import DEFAULT_KEEP_RATE, DEFAULT_MIN_SUPPORT

log = logging.getLogger(__name__)

ANNOTATIONS_GLOB = "annotations-*.parquet"
SIGNATURES_FILE = "signatures.jsonl"
# Columns balance needs; the caption and evidence columns are never read.
_FEATURE_COLUMNS = ["attributes", "concepts", "utility"]


# Beam: annotations -> counted signatures ---------------------------------------------------------

class TableSignatures(beam.DoFn):
    """A table of annotation rows -> (signature, count) for each signature in it (a JSON text key).
    """

    def __init__(self, conditional: bool, use_utility: bool):
        self.conditional = conditional
        self.use_utility = use_utility
        self.rows = Metrics.counter(METRICS_NAMESPACE, "balance_rows")

    def process(self, table):
        columns = table.to_pydict()
        counted = collections.Counter(
            row_signature(attributes, concepts, utility, conditional=self.conditional,
                          use_utility=self.use_utility) for attributes, concepts, utility in zip(
                              columns["attributes"], columns["concepts"], columns["utility"]))
        self.rows.inc(table.num_rows)
        yield from counted.items()


class CountSignatures(beam.PTransform):
    """Tables of annotation rows -> (signature, count): the data set as M4 sees it, N-independent in
    size."""

    def __init__(self, conditional: bool = True, use_utility: bool = False):
        super().__init__()
        self.conditional = conditional
        self.use_utility = use_utility

    def expand(self, tables):
        return (tables
                | "Signatures" >> beam.ParDo(TableSignatures(self.conditional, self.use_utility))
                | "CountPerSignature" >> beam.CombinePerKey(sum))


def count_signatures(annotations_dir: str, work_prefix: str, pipeline_args: Sequence[str],
                     config: BalanceConfig) -> SignatureTable:
    """Run the counting pipeline; return its counts as a table (read back and reconciled here)."""
    from pipeline.annotate import annotation_rows

    pattern = FileSystems.join(annotations_dir, ANNOTATIONS_GLOB)
    rows_written = annotation_rows(annotations_dir)
    options = pipeline_options(pipeline_args, "balancebeam balance")
    counted_by_annotate = _signatures_from_label_sets(annotations_dir, config, rows_written)
    if counted_by_annotate is not None:
        log.info(
            "counted signatures from annotate's label-set counts (%d rows; no second pass over "
            "the annotations)", rows_written)
        return SignatureTable.from_counts(counted_by_annotate.items())
    with beam.Pipeline(options=options) as pipeline:
        _ = (pipeline
             | "ReadAnnotations" >> beam.io.ReadFromParquetBatched(
                 pattern, columns=_FEATURE_COLUMNS).with_output_types(Batch)
             | "CountSignatures" >> CountSignatures(config.conditional, config.utility_tilt > 0)
             | "ToJson" >> beam.MapTuple(lambda signature, count: json.dumps([signature, count]))
             | "WriteCounts" >> beam.io.WriteToText(work_prefix, file_name_suffix=".jsonl"))
    parts = FileSystems.match([work_prefix + "*.jsonl"])[0].metadata_list
    counts = []
    for part in parts:
        with FileSystems.open(part.path) as handle:
            counts.extend(
                tuple(json.loads(line)) for line in handle.read().decode("utf-8").splitlines()
                if line)
    FileSystems.delete([part.path for part in parts])
    counted = sum(count for _, count in counts)
    if counted != rows_written:
        raise ReconciliationError(
            f"balance counted {counted} annotation rows but the Parquet files in {annotations_dir} "
            f"hold {rows_written}: the count lost or repeated rows, so nothing was solved or "
            "written; re-run the job",
            {"rows_counted": counted, "annotation_rows_written": rows_written})
    return SignatureTable.from_counts(counts)


def _signatures_from_label_sets(annotations_dir: str, config: BalanceConfig, rows_written: int):
    """Signature counts from the label-set counts annotate wrote (None when it wrote none or they
    do not add up to the annotation rows: then balance counts the rows itself)."""
    from pipeline.annotate import COUNTS_FILE, LABEL_SETS_FILE

    path = FileSystems.join(annotations_dir, LABEL_SETS_FILE)
    counts_path = FileSystems.join(annotations_dir, COUNTS_FILE)
    if not (FileSystems.exists(path) and FileSystems.exists(counts_path)):
        return None
    counts = collections.Counter()
    for line in read_text(path).splitlines():
        entry = json.loads(line)
        attributes, concepts, utility = entry["label_set"]
        counts[row_signature(attributes, concepts, utility, conditional=config.conditional,
                             use_utility=config.utility_tilt > 0)] += int(entry["count"])
    if sum(counts.values()) != rows_written:
        log.warning(
            "annotate's label-set counts (%d rows) do not match the %d annotation rows; counting "
            "the rows again", sum(counts.values()), rows_written)
        return None
    return counts


def read_label_list(path: str) -> list[str]:
    """One label per line (or comma-separated); '#' starts a comment."""
    labels = []
    for line in read_text(path).splitlines():
        line = line.split("#", 1)[0]
        labels += [item.strip() for item in line.split(",") if item.strip()]
    if not labels:
        raise ValueError(f"{path} lists no labels")
    return labels


# The job ------------------------------------------------------------------------------------------

def add_solve_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that say what to balance and how hard (shared with `balancebeam run`)."""
    parser.add_argument("--keep-rate", default=str(DEFAULT_KEEP_RATE),
                        help="fraction of the data to keep, or 'max' for the largest feasible one")
    parser.add_argument("--representation-gap", type=float,
                        help="largest |share_k - target_k| allowed")
    parser.add_argument("--association-gap", type=float,
                        help="largest |share_k|concept - target_k| allowed")
    parser.add_argument("--targets", default="uniform",
                        help="uniform | preserve | NAME=SHARE,... (e.g. woman=0.5,man=0.5)")
    parser.add_argument("--concepts",
                        help="file of concepts of interest (default: every concept seen)")
    parser.add_argument(
        "--unconstrained-concepts", metavar="FILE",
        help="file of concepts never constrained, whose association is definitional "
        "(e.g. 'bride', 'beard'); the dataset card lists them")
    parser.add_argument(
        "--proxies", help="K (discover the top K proxies beyond --concepts) or a file of proxies")
    parser.add_argument(
        "--min-support", type=float, default=DEFAULT_MIN_SUPPORT,
        help="concepts with fewer annotated rows are left out of the constraints, and reported")
    parser.add_argument(
        "--method", default=DEFAULT_METHOD,
        help="dual (default: exact optimum on the signatures, fast) or exact (cvxpy + Clarabel)")
    parser.add_argument("--constraint-form", choices=("share", "moment"), default="share")
    parser.add_argument(
        "--unconditional", action="store_true",
        help="the paper's unconditional variant: shares among all rows, not annotated ones")
    parser.add_argument("--utility-tilt", type=float, default=0.0,
                        help="tilt keep rates toward the utility column")


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="balancebeam balance", description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog="examples:\n"
        "  balancebeam balance --annotations out/annotations --output out/solution.json \\\n"
        "      --keep-rate max --association-gap 0.05\n"
        "  balancebeam balance --annotations out/annotations --output out/solution.json --explore\n"
    )
    parser.add_argument("--annotations", required=True, help="directory with annotations-*.parquet")
    parser.add_argument("--output", required=True, help="where to write solution.json")
    parser.add_argument(
        "--signatures", help=f"where to write the counted signatures (default: {SIGNATURES_FILE} "
        "next to --output)")
    parser.add_argument(
        "--explore", action="store_true",
        help="print the largest feasible keep rate at association gaps from 0.01 to 0.3 on these "
        "annotations (the price of balance), and write nothing")
    add_solve_arguments(parser)
    return parser.parse_known_args(argv)


def config_from_args(args) -> BalanceConfig:
    keep_rate = args.keep_rate
    if keep_rate != "max":
        try:
            keep_rate = float(keep_rate)
        except ValueError:
            raise UsageError(
                f"--keep-rate must be a number in (0, 1] or 'max', got {keep_rate!r}") from None
    proxies = None
    if args.proxies:
        proxies = int(args.proxies) if args.proxies.isdigit() else read_label_list(args.proxies)
    return BalanceConfig(
        keep_rate=keep_rate, representation_gap=args.representation_gap,
        association_gap=args.association_gap, targets=args.targets,
        concepts=read_label_list(args.concepts) if args.concepts else None,
        unconstrained=read_label_list(args.unconstrained_concepts)
        if args.unconstrained_concepts else None, proxies=proxies, min_support=args.min_support,
        method=args.method, constraint_form=args.constraint_form,
        conditional=not args.unconditional, utility_tilt=args.utility_tilt)


def balance(annotations_dir: str, output: str, config: BalanceConfig, pipeline_args=(),
            signatures_path: str | None = None):
    """Count, solve, write solution.json and signatures.jsonl; return the solution."""
    from solvers.errors import InfeasibleError  # noqa: F401  (re-raised to the caller as is)

    signatures_path = signatures_path or FileSystems.join(
        os.path.dirname(output) or ".", SIGNATURES_FILE)
    table = count_signatures(annotations_dir, f"{signatures_path}.parts-{os.getpid()}",
                             pipeline_args, config)
    log.info("counted %d rows as %d constraint signatures", table.num_rows, len(table.weights))
    solution, projected = solve_table(table, config)
    write_text_atomically(signatures_path,
                          "".join(json.dumps(r) + "\n" for r in table.to_records()))
    write_text_atomically(output, solution.to_json())
    stats = solution.statistics
    before, after = (stats[f"data_bias_{stage}"]["summary"]["association_bias_max"]
                     for stage in ("before", "after"))
    log.info("solved M4 (%s) at keep rate %.4f on %d signatures: data AB max %s -> %s; wrote %s",
             solution.method, solution.keep_rate, stats["signatures_solved"],
             "n/a" if before is None else f"{before:.3f}",
             "n/a" if after is None else f"{after:.3f}", output)
    (log.info if solution.status == "optimal" else log.warning)("solution %s",
                                                                solution.certificate())
    return solution


def run(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args, pipeline_args = parse_args(argv)
    config = config_from_args(args)
    if args.explore:
        table = count_signatures(args.annotations, f"{args.output}.parts-{os.getpid()}",
                                 pipeline_args, config)
        print(
            format_price_of_balance(price_of_balance(build_problem(table, config)[1], config),
                                    table.num_rows))
        return 0
    balance(args.annotations, args.output, config, pipeline_args, args.signatures)
    return 0


def format_price_of_balance(curve: list[dict], rows: int) -> str:
    """The price-of-balance curve as a small table for the terminal."""
    lines = [f"largest feasible keep rate on these {rows} rows, by association gap (share):",
             "association gap  max keep rate  rows kept"]
    for point in curve:
        lines.append(f"{point['association_gap']:>15.2f}  {point['max_keep_rate']:>13.4f}  "
                     f"{point['max_keep_rate'] * rows:>9.0f}")
    return "\n".join(lines)
