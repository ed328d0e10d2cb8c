"""The balance job: count constraint signatures of the annotations (Beam), solve M4 on them in memory.

Writes solution.json (the duals every resample worker applies, plus readable statistics) and
signatures.jsonl (the counted signatures the report reads).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import logging
import os
import time
from typing import Sequence

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from pipeline.errors import DataError, ReconciliationError, UsageError
from pipeline.files import read_text, write_text_atomically
from pipeline.options import pipeline_options
from pipeline.quarantine import METRICS_NAMESPACE
from pipeline.signatures import SignatureTable, row_signature
from solvers import progress as progress_policy
from solvers.api import METHODS as SOLVER_METHODS
from solvers.problem import DEFAULT_KEEP_RATE, DEFAULT_MIN_SUPPORT

log = logging.getLogger(__name__)

ANNOTATIONS_GLOB = "annotations-*.parquet"
SIGNATURES_FILE = "signatures.jsonl"
# The solvers balance offers. It solves on counted signatures, which fit in memory whatever N is, so
# the dual solver is exact there and the streaming solver (for rows that do not fit) has no place.
METHODS = tuple(method for method in SOLVER_METHODS if method != "streaming")
STREAMING_REFUSED = (
    "--method streaming is not offered by balance: balance solves on counted signatures, which fit in "
    "memory whatever the number of rows, so 'dual' reaches the exact optimum, faster; the streaming "
    "solver (solvers.solve_stream) is for rows that do not fit in memory, from Python")
DEFAULT_METHOD = "dual"
# With two values at 50% each a share can be at most 0.5 from its target: a wider gap binds nothing.
WIDE_SHARE_GAP = 0.5
# Columns balance needs; the caption and evidence columns are never read.
_FEATURE_COLUMNS = ["attributes", "concepts", "utility"]


@dataclasses.dataclass
class BalanceConfig:
    """What to balance and how hard: the flags of `balancebeam balance`, checked once."""

    keep_rate: float | str = DEFAULT_KEEP_RATE
    representation_gap: float | None = None
    association_gap: float | None = None
    targets: str | list = "uniform"
    concepts: list[str] | None = None  # labels of interest; None: every concept seen
    proxies: int | list[str] | None = None  # top-K discovery, or an explicit list
    unconstrained: list[str] | None = None  # concepts whose association is definitional: never constrained
    min_support: float = DEFAULT_MIN_SUPPORT
    method: str = DEFAULT_METHOD
    constraint_form: str = "share"
    conditional: bool = True
    utility_tilt: float = 0.0

    def __post_init__(self):
        """Refuse what cannot work, in the flags' own words, before any job runs."""
        if self.method == "streaming":
            raise UsageError(STREAMING_REFUSED)
        if self.method not in METHODS:
            raise UsageError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.keep_rate != "max":
            if isinstance(self.keep_rate, str) or not 0 < float(self.keep_rate) <= 1:
                raise UsageError(f"--keep-rate must be a number in (0, 1] or 'max', got {self.keep_rate!r}")
        for flag, gap in (("--representation-gap", self.representation_gap),
                          ("--association-gap", self.association_gap)):
            if gap is not None and not (np.isfinite(gap) and gap >= 0):
                raise UsageError(f"{flag} must be a number >= 0, got {gap}")
            if gap is not None and self.constraint_form == "share" and gap >= WIDE_SHARE_GAP:
                log.warning("%s %g constrains nothing: a share is never further than %g from a target of "
                            "two equal values", flag, gap, WIDE_SHARE_GAP)
        if not (np.isfinite(self.min_support) and self.min_support >= 0):
            raise UsageError(f"--min-support must be a number >= 0, got {self.min_support}")
        if not (np.isfinite(self.utility_tilt) and self.utility_tilt >= 0):
            raise UsageError(f"--utility-tilt must be a number >= 0, got {self.utility_tilt}")
        if isinstance(self.proxies, int) and self.proxies < 0:
            raise UsageError("the number of proxies must be >= 0")


# Beam: annotations -> counted signatures ---------------------------------------------------------

class TableSignatures(beam.DoFn):
    """A table of annotation rows -> (signature, count) for each signature in it (a JSON text key)."""

    def __init__(self, conditional: bool, use_utility: bool):
        self.conditional = conditional
        self.use_utility = use_utility
        self.rows = Metrics.counter(METRICS_NAMESPACE, "balance_rows")

    def process(self, table):
        columns = table.to_pydict()
        counted = collections.Counter(
            row_signature(attributes, concepts, utility, conditional=self.conditional, use_utility=self.use_utility)
            for attributes, concepts, utility in zip(columns["attributes"], columns["concepts"], columns["utility"]))
        self.rows.inc(table.num_rows)
        yield from counted.items()


class CountSignatures(beam.PTransform):
    """Tables of annotation rows -> (signature, count): the data set as M4 sees it, N-independent in size."""

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
        log.info("counted signatures from annotate's label-set counts (%d rows; no second pass over "
                 "the annotations)", rows_written)
        return SignatureTable.from_counts(counted_by_annotate.items())
    with beam.Pipeline(options=options) as pipeline:
        _ = (pipeline
             | "ReadAnnotations" >> beam.io.ReadFromParquetBatched(pattern, columns=_FEATURE_COLUMNS)
             | "CountSignatures" >> CountSignatures(config.conditional, config.utility_tilt > 0)
             | "ToJson" >> beam.MapTuple(lambda signature, count: json.dumps([signature, count]))
             | "WriteCounts" >> beam.io.WriteToText(work_prefix, file_name_suffix=".jsonl"))
    parts = FileSystems.match([work_prefix + "*.jsonl"])[0].metadata_list
    counts = []
    for part in parts:
        with FileSystems.open(part.path) as handle:
            counts.extend(tuple(json.loads(line)) for line in handle.read().decode("utf-8").splitlines() if line)
    FileSystems.delete([part.path for part in parts])
    counted = sum(count for _, count in counts)
    if counted != rows_written:
        raise ReconciliationError(
            f"balance counted {counted} annotation rows but the Parquet files in {annotations_dir} hold "
            f"{rows_written}: the count lost or repeated rows, so nothing was solved or written; re-run the job",
            {"rows_counted": counted, "annotation_rows_written": rows_written})
    return SignatureTable.from_counts(counts)


def _signatures_from_label_sets(annotations_dir: str, config: BalanceConfig, rows_written: int):
    """Signature counts from the label-set counts annotate wrote (None when it wrote none or they
    do not add up to the annotation rows: then balance counts the rows itself)."""
    from pipeline.annotate import COUNTS_FILE, LABEL_SETS_FILE

    path = FileSystems.join(annotations_dir, LABEL_SETS_FILE)
    if not (FileSystems.exists(path) and FileSystems.exists(FileSystems.join(annotations_dir, COUNTS_FILE))):
        return None
    counts = collections.Counter()
    for line in read_text(path).splitlines():
        entry = json.loads(line)
        attributes, concepts, utility = entry["label_set"]
        counts[row_signature(attributes, concepts, utility, conditional=config.conditional,
                             use_utility=config.utility_tilt > 0)] += int(entry["count"])
    if sum(counts.values()) != rows_written:
        log.warning("annotate's label-set counts (%d rows) do not match the %d annotation rows; counting "
                    "the rows again", sum(counts.values()), rows_written)
        return None
    return counts


# In memory: choose concepts, discover proxies, solve --------------------------------------------

def concept_shares(table: SignatureTable, q: np.ndarray | None = None):
    """Per group g: overall share of each value, and per concept r its support and value shares.

    Returns {group: (columns, overall_share (m_g,), support (c,), share (m_g, c))} among
    group-annotated rows, weighted by count * q.
    """
    weights = table.weights if q is None else table.weights * q
    result = {}
    for group, columns in zip(table.group_names, table.groups):
        annotated = table.attributes[:, columns].max(axis=1) * weights  # (S,)
        values = table.attributes[:, columns] * weights[:, None]  # (S, m_g)
        total = max(annotated.sum(), 1e-12)
        support = annotated @ table.concepts  # (c,)
        share = (values.T @ table.concepts) / np.maximum(support, 1e-12)
        result[group] = (columns, values.sum(axis=0) / total, support, share)
    return result


def discover_proxies(table: SignatureTable, interest: Sequence[str], k: int, min_support: float) -> list[dict]:
    """Top-k concepts outside `interest` whose attribute share deviates most from the overall share.

    Score = (support / annotated rows) * max_k |share_k|r - share_k|, maximised over groups: a
    concept counts as a proxy when it is both common and skewed (DESIGN.md, "Proxies").
    """
    interest = set(interest)
    scored = {}
    for group, (columns, overall, support, share) in concept_shares(table).items():
        annotated_rows = max(float(table.attributes[:, columns].max(axis=1) @ table.weights), 1.0)
        deviation = np.abs(share - overall[:, None]).max(axis=0)  # (c,)
        for r, name in enumerate(table.concept_names):
            if name in interest or support[r] < min_support:
                continue
            score = float(support[r] / annotated_rows * deviation[r])
            if score > scored.get(name, {"score": -1.0})["score"]:
                scored[name] = {"concept": name, "group": group, "score": score, "support": float(support[r]),
                                "deviation": float(deviation[r]),
                                "shares": {table.attribute_names[c]: float(share[j, r]) for j, c in enumerate(columns)}}
    ranked = sorted(scored.values(), key=lambda entry: (-entry["score"], entry["concept"]))
    return ranked[:k]


def parse_targets(targets, attribute_names: Sequence[str]):
    """'uniform' | 'preserve' | 'woman=0.5,man=0.5' (names full or short) | '0.5,0.5' -> problem targets."""
    if not isinstance(targets, str) or targets in ("uniform", "preserve"):
        return targets
    items = [item.strip() for item in targets.split(",") if item.strip()]
    if all("=" not in item for item in items):
        values = [float(item) for item in items]
        if len(values) != len(attribute_names):
            raise ValueError(f"--targets lists {len(values)} shares for {len(attribute_names)} attribute values "
                             f"({', '.join(attribute_names)})")
        return np.array(values)
    shares = {}
    for item in items:
        name, separator, value = item.partition("=")
        if not separator:
            raise ValueError(f"--targets: expected NAME=SHARE, got {item!r}")
        matches = [a for a in attribute_names if a == name.strip() or a.split(":", 1)[-1] == name.strip()]
        if len(matches) != 1:
            raise ValueError(f"--targets: {name.strip()!r} names {len(matches)} of the attribute values "
                             f"({', '.join(attribute_names)})")
        shares[matches[0]] = float(value)
    missing = [a for a in attribute_names if a not in shares]
    if missing:
        raise ValueError(f"--targets gives no share for {', '.join(missing)}")
    return np.array([shares[a] for a in attribute_names])


def choose_concepts(table: SignatureTable, config: BalanceConfig) -> tuple[list[str], list[dict], list[str]]:
    """(concepts to constrain, proxies with their scores, requested labels never seen)."""
    exempt = set(config.unconstrained or ())
    if config.concepts is None:
        interest, not_seen = [c for c in table.concept_names if c not in exempt], []
    else:
        interest = [c for c in dict.fromkeys(config.concepts) if c in table.concept_names and c not in exempt]
        not_seen = [c for c in dict.fromkeys(config.concepts) if c not in table.concept_names]
    if isinstance(config.proxies, int):
        proxies = discover_proxies(table, interest + sorted(exempt), config.proxies, config.min_support)
    elif config.proxies:
        proxies = [{"concept": c, "given": True} for c in dict.fromkeys(config.proxies)
                   if c in table.concept_names and c not in interest and c not in exempt]
        not_seen += [c for c in config.proxies if c not in table.concept_names]
    else:
        proxies = []
    return interest + [p["concept"] for p in proxies], proxies, not_seen


def build_problem(table: SignatureTable, config: BalanceConfig):
    """The M4 problem on the counted signatures, projected onto the chosen concepts."""
    concepts, proxies, not_seen = choose_concepts(table, config)
    # A concept present in every row would only repeat the representation constraint.
    concepts = [c for c in concepts if not table.concepts[:, table.concept_names.index(c)].all()]
    projected = table.project(concepts)
    return problem_on(projected, config), projected, proxies, not_seen


def problem_on(projected: SignatureTable, config: BalanceConfig):
    """The M4 problem of `config` on an already projected table (one projection, several problems)."""
    from solvers.problem import BalanceProblem

    return BalanceProblem(
        projected.attributes, projected.concepts, groups=projected.groups,
        targets=parse_targets(config.targets, projected.attribute_names), keep_rate=config.keep_rate,
        representation_gap=config.representation_gap, association_gap=config.association_gap,
        constraint_form=config.constraint_form, min_support=config.min_support, weights=projected.weights,
        utility=projected.utility if config.utility_tilt > 0 else None, utility_tilt=config.utility_tilt,
        conditional=config.conditional, attribute_names=projected.attribute_names,
        concept_names=projected.concept_names, group_names=projected.group_names)


def solve_table(table: SignatureTable, config: BalanceConfig):
    """Solve M4 on counted signatures; return the solution with readable statistics attached."""
    from solvers import data_bias, solve

    if not table.attribute_names:
        raise DataError("no annotated row shows any attribute value: nothing to balance")
    for group, columns in zip(table.group_names, table.groups):
        if len(columns) < 2:
            raise DataError(f"every {group}-annotated row shows the same value "
                            f"({table.attribute_names[columns[0]]!r}): nothing to balance")
    problem, projected, proxies, not_seen = build_problem(table, config)
    started = time.perf_counter()
    bar = {"progress": progress_policy.enabled()} if config.method == "dual" else {}  # exact: cvxpy's own
    solution = solve(problem, method=config.method, **bar)
    seconds = time.perf_counter() - started
    solution.exact_counts, exact_statistics = exact_counts(problem, projected, solution, config)
    bias_options = dict(weights=projected.weights, targets=np.asarray(problem.spec.targets),
                        groups=projected.groups, min_support=config.min_support,
                        attribute_names=projected.attribute_names, concept_names=projected.concept_names,
                        group_names=projected.group_names, conditional=config.conditional)
    before = data_bias(projected.attributes, projected.concepts, **bias_options)
    after = data_bias(projected.attributes, projected.concepts, q=solution.q, **bias_options)
    kept = float(projected.weights @ solution.q)
    solution.statistics = {
        **solution.statistics,
        "rows": table.num_rows,
        "signatures_counted": int(len(table.weights)),
        "signatures_solved": int(len(projected.weights)),
        "rows_with_attributes": {g: float(table.attributes[:, cols].max(axis=1) @ table.weights)
                                 for g, cols in zip(table.group_names, table.groups)},
        "keep_rate_requested": config.keep_rate,
        "keep_rate": solution.keep_rate,
        "expected_rows_kept": kept,
        "concepts_of_interest": [c for c in projected.concept_names if c not in {p["concept"] for p in proxies}],
        "proxies": proxies,
        "concepts_not_seen": not_seen,
        "excluded_low_support": problem.excluded_concepts,
        "min_support": config.min_support,
        "targets": dict(zip(projected.attribute_names, problem.spec.targets)),
        "data_bias_before": before.to_dict(),
        "data_bias_after": after.to_dict(),
        "balance_seconds": seconds,
        "exact_counts": exact_statistics,
        "dropped_concepts": dropped_concepts(problem, solution, after),
        "unconstrained_concepts": unconstrained_concepts(table, config),
        "price_of_balance": price_of_balance(projected, config),
        "config": dataclasses.asdict(config),
    }
    log_dropped_concepts(solution.statistics["dropped_concepts"])
    return solution, projected


# More dropped concepts than this are one warning line (names only): at web scale dozens of rare
# concepts show one value only, and a line each would bury the rest of the output.
DROPPED_CONCEPTS_LISTED = 3


def log_dropped_concepts(entries: list[dict]) -> None:
    if len(entries) <= DROPPED_CONCEPTS_LISTED:
        for entry in entries:
            log.warning("the plan drops a concept: %s", entry["reason"])
        return
    names = ", ".join(f"'{entry['concept']}'" for entry in entries[:10])
    more = f" and {len(entries) - 10} more" if len(entries) > 10 else ""
    log.warning("the plan drops %d concepts (%s%s): their annotated rows show one value only, or the plan "
                "keeps none of them; solution.json and the report give each one's reason", len(entries), names, more)


def dropped_concepts(problem, solution, after) -> list[dict]:
    """Constrained concepts the plan keeps none of, each with its support and the reason in words."""
    spec = problem.spec
    base_support = problem.unit_supports(np.ones(problem.num_rows))
    dropped = problem.dropped_units(solution.q)
    names = set(after.dropped_concepts())
    entries = []
    for r, concept in enumerate(spec.concept_names):
        units = [u for u in range(spec.num_units) if spec.unit_concepts[u] == r]
        if not units or not dropped[units].all() or concept not in names:
            continue
        support = float(base_support[units[0]])
        before_shares = {}
        for u in units:
            value = spec.unit_values[u]
            rows = problem.weights * problem.attributes[:, value] * problem.concepts[:, r]
            before_shares[spec.attribute_names[value]] = float(rows.sum() / support) if support else 0.0
        gap = spec.unit_gaps[units[0]]
        value, share = max(before_shares.items(), key=lambda item: (item[1] == 1.0, abs(item[1] - spec.targets[
            spec.attribute_names.index(item[0])])))
        target = spec.targets[spec.attribute_names.index(value)]
        short = value.split(":", 1)[-1]
        if share == 1.0:
            reason = (f"'{concept}': all {support:.0f} annotated rows are '{short}'; balancing it to "
                      f"{target:.0%} ± {gap:.0%} is only possible by dropping it")
        elif share == 0.0:
            reason = (f"'{concept}': none of its {support:.0f} annotated rows is '{short}'; balancing it to "
                      f"{target:.0%} ± {gap:.0%} is only possible by dropping it")
        else:
            reason = (f"'{concept}': {share:.0%} of its {support:.0f} annotated rows are '{short}'; at keep rate "
                      f"{solution.keep_rate:.3f} the plan meets {target:.0%} ± {gap:.0%} by keeping none of them")
        entries.append({"concept": concept, "support": support, "shares": before_shares, "reason": reason})
    return entries


def unconstrained_concepts(table: SignatureTable, config: BalanceConfig) -> list[dict]:
    """The concepts the user exempted (--unconstrained-concepts), with their support and shares."""
    entries = []
    shares = concept_shares(table)
    for concept in config.unconstrained or ():
        if concept not in table.concept_names:
            entries.append({"concept": concept, "support": 0.0, "shares": {}, "seen": False})
            continue
        r = table.concept_names.index(concept)
        entry = {"concept": concept, "seen": True, "support": 0.0, "shares": {}}
        for group, (columns, _, support, share) in shares.items():
            entry["support"] += float(support[r])
            entry["shares"].update({table.attribute_names[k]: float(share[j, r]) for j, k in enumerate(columns)})
        entries.append(entry)
    return entries


# The association gaps the price-of-balance curve is drawn at (share gaps).
PRICE_OF_BALANCE_GAPS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3)


def price_of_balance(projected: SignatureTable, config: BalanceConfig, gaps=PRICE_OF_BALANCE_GAPS) -> list[dict]:
    """The largest feasible keep rate at each association gap, on these signatures (an LP per gap).

    Cheap at any N: it runs on the counted signatures, projected onto the chosen concepts (as
    build_problem returns them). Only for the share form (moments have no common scale to draw
    against).
    """
    from solvers.max_rate import max_keep_rate

    if config.constraint_form != "share":
        return []
    return [{"association_gap": gap, "max_keep_rate": max_keep_rate(problem_on(
        projected, dataclasses.replace(config, association_gap=gap, keep_rate=1.0)))} for gap in gaps]


def exact_counts(problem, projected: SignatureTable, solution, config: BalanceConfig):
    """Whole rows to keep per signature ({signature text: [n_s, k_s, constrained]}) and how it went.

    Resample's exact mode keeps exactly k_s rows of each constrained signature (those with the
    smallest keyed hash), so the release meets the gaps in its own counts, not only on average.
    """
    from solvers.rounding import allocate

    started = time.perf_counter()
    try:
        allocation = allocate(problem, solution.q)
    except (RuntimeError, ValueError) as error:
        log.warning("no exact counts (%s): resample can only sample by probability (--mode bernoulli)", error)
        return None, {"status": "failed", "message": str(error)}
    matrix, _ = problem.constraint_matrix()
    constrained = np.diff(matrix.tocsr().indptr) > 0
    texts = projected.signature_texts(config.conditional, config.utility_tilt > 0)
    counts = {text: [int(n), int(k), int(c)] for text, n, k, c in zip(
        texts, np.round(projected.weights).astype(np.int64), allocation.counts, constrained)}
    plan = float(projected.weights @ solution.q)
    statistics = {"status": allocation.status, "seconds": time.perf_counter() - started,
                  "rows_kept": int(allocation.counts.sum()), "planned_rows": plan,
                  "constrained_signatures": int(constrained.sum()), **allocation.statistics}
    return counts, statistics


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
    parser.add_argument("--representation-gap", type=float, help="largest |share_k - target_k| allowed")
    parser.add_argument("--association-gap", type=float, help="largest |share_k|concept - target_k| allowed")
    parser.add_argument("--targets", default="uniform",
                        help="uniform | preserve | NAME=SHARE,... (e.g. woman=0.5,man=0.5)")
    parser.add_argument("--concepts", help="file of concepts of interest (default: every concept seen)")
    parser.add_argument("--unconstrained-concepts", metavar="FILE",
                        help="file of concepts never constrained, whose association is definitional "
                             "(e.g. 'bride', 'beard'); the dataset card lists them")
    parser.add_argument("--proxies", help="K (discover the top K proxies beyond --concepts) or a file of proxies")
    parser.add_argument("--min-support", type=float, default=DEFAULT_MIN_SUPPORT,
                        help="concepts with fewer annotated rows are left out of the constraints, and reported")
    parser.add_argument("--method", default=DEFAULT_METHOD,
                        help="dual (default: exact optimum on the signatures, fast) or exact (cvxpy + Clarabel)")
    parser.add_argument("--constraint-form", choices=("share", "moment"), default="share")
    parser.add_argument("--unconditional", action="store_true",
                        help="the paper's unconditional variant: shares among all rows, not annotated ones")
    parser.add_argument("--utility-tilt", type=float, default=0.0, help="tilt keep rates toward the utility column")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="balancebeam balance", description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog="examples:\n  balancebeam balance --annotations out/annotations --output out/solution.json --keep-rate max --association-gap 0.05\n  balancebeam balance --annotations out/annotations --output out/solution.json --explore\n")
    parser.add_argument("--annotations", required=True, help="directory with annotations-*.parquet")
    parser.add_argument("--output", required=True, help="where to write solution.json")
    parser.add_argument("--signatures", help=f"where to write the counted signatures (default: {SIGNATURES_FILE} "
                        "next to --output)")
    parser.add_argument("--explore", action="store_true",
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
            raise UsageError(f"--keep-rate must be a number in (0, 1] or 'max', got {keep_rate!r}") from None
    proxies = None
    if args.proxies:
        proxies = int(args.proxies) if args.proxies.isdigit() else read_label_list(args.proxies)
    return BalanceConfig(
        keep_rate=keep_rate, representation_gap=args.representation_gap, association_gap=args.association_gap,
        targets=args.targets, concepts=read_label_list(args.concepts) if args.concepts else None,
        unconstrained=read_label_list(args.unconstrained_concepts) if args.unconstrained_concepts else None,
        proxies=proxies, min_support=args.min_support, method=args.method,
        constraint_form=args.constraint_form, conditional=not args.unconditional, utility_tilt=args.utility_tilt)


def balance(annotations_dir: str, output: str, config: BalanceConfig, pipeline_args=(),
            signatures_path: str | None = None):
    """Count, solve, write solution.json and signatures.jsonl; return the solution."""
    from solvers.errors import InfeasibleError  # noqa: F401  (re-raised to the caller as is)

    signatures_path = signatures_path or FileSystems.join(os.path.dirname(output) or ".", SIGNATURES_FILE)
    table = count_signatures(annotations_dir, f"{signatures_path}.parts-{os.getpid()}", pipeline_args, config)
    log.info("counted %d rows as %d constraint signatures", table.num_rows, len(table.weights))
    solution, projected = solve_table(table, config)
    write_text_atomically(signatures_path, "".join(json.dumps(r) + "\n" for r in table.to_records()))
    write_text_atomically(output, solution.to_json())
    stats = solution.statistics
    before, after = (stats[f"data_bias_{stage}"]["summary"]["association_bias_max"] for stage in ("before", "after"))
    log.info("solved M4 (%s) at keep rate %.4f on %d signatures: data AB max %s -> %s; wrote %s",
             solution.method, solution.keep_rate, stats["signatures_solved"],
             "n/a" if before is None else f"{before:.3f}", "n/a" if after is None else f"{after:.3f}", output)
    (log.info if solution.status == "optimal" else log.warning)("solution %s", solution.certificate())
    return solution


def run(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args, pipeline_args = parse_args(argv)
    config = config_from_args(args)
    if args.explore:
        table = count_signatures(args.annotations, f"{args.output}.parts-{os.getpid()}", pipeline_args, config)
        print(format_price_of_balance(price_of_balance(build_problem(table, config)[1], config), table.num_rows))
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
