"""The plan: what balance constrains and how it solves M4, in memory, on counted signatures.

`BalanceConfig` holds the flags of `balancebeam balance`, checked once. From a `SignatureTable`
(the counted signatures the balance job's Beam pass or annotate's label-set counts give), it
chooses the concepts and proxies to constrain, builds the problem, solves it, and attaches what the
report and the card need: the data bias before and after, the concepts the plan drops or was told
to leave alone, the price of balance and the exact whole-row counts resample's exact mode keeps.
No Beam here: this runs in the driver, at any N, because signatures are few.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Sequence

import numpy as np

from pipeline.errors import DataError, UsageError
from pipeline.signatures import SignatureTable, split_label
from solvers import data_bias
from solvers import progress as progress_policy
from solvers.api import METHODS as SOLVER_METHODS
from solvers.problem import DEFAULT_KEEP_RATE, DEFAULT_MIN_SUPPORT, check_keep_rate

log = logging.getLogger(__name__)

# The solvers balance offers. It solves on counted signatures, which fit in memory whatever N is, so
# the dual solver is exact there and the streaming solver (for rows that do not fit) has no place.
METHODS = tuple(method for method in SOLVER_METHODS if method != "streaming")
STREAMING_REFUSED = (
    "--method streaming is not offered by balance: balance solves on counted signatures, which fit "
    "in memory whatever the number of rows, so 'dual' reaches the exact optimum, faster; the "
    "streaming solver (solvers.solve_stream) is for rows that do not fit in memory, from Python")
DEFAULT_METHOD = "dual"
# With two values at 50% each a share can be at most 0.5 from its target: a wider gap binds nothing.
WIDE_SHARE_GAP = 0.5


@dataclasses.dataclass
class BalanceConfig:
    """What to balance and how hard: the flags of `balancebeam balance`, checked once."""

    keep_rate: float | str = DEFAULT_KEEP_RATE
    representation_gap: float | None = None
    association_gap: float | None = None
    targets: str | list = "uniform"
    concepts: list[str] | None = None  # labels of interest; None: every concept seen
    proxies: int | list[str] | None = None  # top-K discovery, or an explicit list
    # concepts whose association is definitional: never constrained
    unconstrained: list[str] | None = None
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
        try:
            check_keep_rate(self.keep_rate)
        except ValueError:
            raise UsageError(
                f"--keep-rate must be a number in (0, 1] or 'max', got {self.keep_rate!r}"
            ) from None
        for flag, gap in (("--representation-gap", self.representation_gap),
                          ("--association-gap", self.association_gap)):
            if gap is not None and not (np.isfinite(gap) and gap >= 0):
                raise UsageError(f"{flag} must be a number >= 0, got {gap}")
            if gap is not None and self.constraint_form == "share" and gap >= WIDE_SHARE_GAP:
                log.warning(
                    "%s %g constrains nothing: a share is never further than %g from a target of "
                    "two equal values", flag, gap, WIDE_SHARE_GAP)
        if not (np.isfinite(self.min_support) and self.min_support >= 0):
            raise UsageError(f"--min-support must be a number >= 0, got {self.min_support}")
        if not (np.isfinite(self.utility_tilt) and self.utility_tilt >= 0):
            raise UsageError(f"--utility-tilt must be a number >= 0, got {self.utility_tilt}")
        if isinstance(self.proxies, int) and self.proxies < 0:
            raise UsageError("the number of proxies must be >= 0")


# In memory: choose concepts, discover proxies, solve --------------------------------------------

def concept_shares(table: SignatureTable, q: np.ndarray | None = None):
    """Per group g: overall share of each value, and per concept r its support and value shares.

    Returns {group: (columns, overall_share (m_g,), support (c,), share (m_g, c))} among
    group-annotated rows, weighted by count * q: the shares solvers.bias.data_bias measures (0 where
    no row is annotated), so the plan, the report and the release's statistics share one definition.
    """
    if not table.groups:
        return {}
    bias = data_bias(table.attributes, table.concepts, q=q, weights=table.weights,
                     groups=table.groups, attribute_names=table.attribute_names,
                     concept_names=table.concept_names, group_names=table.group_names)
    return {
        group: (columns, np.nan_to_num(bias.value_share[columns]), bias.kept_support[columns[0]],
                np.nan_to_num(bias.concept_share[columns]))
        for group, columns in zip(table.group_names, table.groups)
    }


def discover_proxies(table: SignatureTable, interest: Sequence[str], k: int,
                     min_support: float) -> list[dict]:
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
                shares = {table.attribute_names[c]: float(share[j, r])
                          for j, c in enumerate(columns)}
                scored[name] = {"concept": name, "group": group, "score": score,
                                "support": float(support[r]), "deviation": float(deviation[r]),
                                "shares": shares}
    ranked = sorted(scored.values(), key=lambda entry: (-entry["score"], entry["concept"]))
    return ranked[:k]


def parse_targets(targets, attribute_names: Sequence[str]):
    """'uniform' | 'preserve' | 'woman=0.5,man=0.5' (names full or short) | '0.5,0.5' -> problem
    targets."""
    if not isinstance(targets, str) or targets in ("uniform", "preserve"):
        return targets
    items = [item.strip() for item in targets.split(",") if item.strip()]
    if all("=" not in item for item in items):
        values = [float(item) for item in items]
        if len(values) != len(attribute_names):
            raise ValueError(
                f"--targets lists {len(values)} shares for {len(attribute_names)} attribute values "
                f"({', '.join(attribute_names)})")
        return np.array(values)
    shares = {}
    for item in items:
        name, separator, value = item.partition("=")
        if not separator:
            raise ValueError(f"--targets: expected NAME=SHARE, got {item!r}")
        matches = [a for a in attribute_names if name.strip() in (a, split_label(a)[1])]
        if len(matches) != 1:
            raise ValueError(
                f"--targets: {name.strip()!r} names {len(matches)} of the attribute values "
                f"({', '.join(attribute_names)})")
        shares[matches[0]] = float(value)
    missing = [a for a in attribute_names if a not in shares]
    if missing:
        raise ValueError(f"--targets gives no share for {', '.join(missing)}")
    return np.array([shares[a] for a in attribute_names])


def choose_concepts(table: SignatureTable,
                    config: BalanceConfig) -> tuple[list[str], list[dict], list[str]]:
    """(concepts to constrain, proxies with their scores, requested labels never seen)."""
    exempt = set(config.unconstrained or ())
    if config.concepts is None:
        interest, not_seen = [c for c in table.concept_names if c not in exempt], []
    else:
        interest = [c for c in dict.fromkeys(config.concepts)
                    if c in table.concept_names and c not in exempt]
        not_seen = [c for c in dict.fromkeys(config.concepts) if c not in table.concept_names]
    if isinstance(config.proxies, int):
        proxies = discover_proxies(table, interest + sorted(exempt), config.proxies,
                                   config.min_support)
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
    """The M4 problem of `config` on an already projected table (one projection, several problems).
    """
    from solvers.problem import BalanceProblem

    return BalanceProblem(projected.attributes, projected.concepts, groups=projected.groups,
                          targets=parse_targets(config.targets, projected.attribute_names),
                          keep_rate=config.keep_rate, representation_gap=config.representation_gap,
                          association_gap=config.association_gap,
                          constraint_form=config.constraint_form, min_support=config.min_support,
                          weights=projected.weights,
                          utility=projected.utility if config.utility_tilt > 0 else None,
                          utility_tilt=config.utility_tilt, conditional=config.conditional,
                          attribute_names=projected.attribute_names,
                          concept_names=projected.concept_names, group_names=projected.group_names)


def solve_table(table: SignatureTable, config: BalanceConfig):
    """Solve M4 on counted signatures; return the solution with readable statistics attached."""
    from solvers import solve
    from solvers.api import one_blas_thread

    if not table.attribute_names:
        raise DataError("no annotated row shows any attribute value: nothing to balance")
    for group, columns in zip(table.group_names, table.groups):
        if len(columns) < 2:
            raise DataError(f"every {group}-annotated row shows the same value "
                            f"({table.attribute_names[columns[0]]!r}): nothing to balance")
    # BLAS on one thread throughout (solvers.api.one_blas_thread): q, and the statistics computed
    # from it, do not depend on the machine's core count
    with one_blas_thread():
        problem, projected, proxies, not_seen = build_problem(table, config)
        started = time.perf_counter()
        # exact: cvxpy's own
        bar = {"progress": progress_policy.enabled()} if config.method == "dual" else {}
        solution = solve(problem, method=config.method, **bar)
        seconds = time.perf_counter() - started
        solution.exact_counts, exact_statistics = exact_counts(problem, projected, solution, config)
        bias_options = dict(weights=projected.weights, targets=np.asarray(problem.spec.targets),
                            groups=projected.groups, min_support=config.min_support,
                            attribute_names=projected.attribute_names,
                            concept_names=projected.concept_names,
                            group_names=projected.group_names, conditional=config.conditional)
        before = data_bias(projected.attributes, projected.concepts, **bias_options)
        after = data_bias(projected.attributes, projected.concepts, q=solution.q, **bias_options)
        kept = float(projected.weights @ solution.q)
        proxy_names = {p["concept"] for p in proxies}
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
            "concepts_of_interest": [c for c in projected.concept_names if c not in proxy_names],
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
    log.warning(
        "the plan drops %d concepts (%s%s): their annotated rows show one value only, or the plan "
        "keeps none of them; solution.json and the report give each one's reason", len(entries),
        names, more)


def dropped_concepts(problem, solution, after) -> list[dict]:
    """Constrained concepts the plan keeps none of, each with its support and the reason in words.
    """
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
            share = float(rows.sum() / support) if support else 0.0
            before_shares[spec.attribute_names[value]] = share
        gap = spec.unit_gaps[units[0]]
        value, share = max(
            before_shares.items(),
            key=lambda item: (item[1] == 1.0,
                              abs(item[1] - spec.targets[spec.attribute_names.index(item[0])])))
        target = spec.targets[spec.attribute_names.index(value)]
        short = split_label(value)[1]
        if share == 1.0:
            reason = (
                f"'{concept}': all {support:.0f} annotated rows are '{short}'; balancing it to "
                f"{target:.0%} ± {gap:.0%} is only possible by dropping it")
        elif share == 0.0:
            reason = (
                f"'{concept}': none of its {support:.0f} annotated rows is '{short}'; balancing it "
                f"to {target:.0%} ± {gap:.0%} is only possible by dropping it")
        else:
            reason = (
                f"'{concept}': {share:.0%} of its {support:.0f} annotated rows are '{short}'; at "
                f"keep rate {solution.keep_rate:.3f} the plan meets {target:.0%} ± {gap:.0%} by "
                "keeping none of them"
            )
        entries.append(
            {"concept": concept, "support": support, "shares": before_shares, "reason": reason})
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
            entry["shares"].update(
                {table.attribute_names[k]: float(share[j, r])
                 for j, k in enumerate(columns)})
        entries.append(entry)
    return entries


# The association gaps the price-of-balance curve is drawn at (share gaps).
PRICE_OF_BALANCE_GAPS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3)


def price_of_balance(projected: SignatureTable, config: BalanceConfig,
                     gaps=PRICE_OF_BALANCE_GAPS) -> list[dict]:
    """The largest feasible keep rate at each association gap, on these signatures (an LP per gap).

    Cheap at any N: it runs on the counted signatures, projected onto the chosen concepts (as
    build_problem returns them). Only for the share form (moments have no common scale to draw
    against).
    """
    from solvers.max_rate import max_keep_rate

    if config.constraint_form != "share":
        return []
    return [{
        "association_gap": gap, "max_keep_rate": max_keep_rate(
            problem_on(projected, dataclasses.replace(config, association_gap=gap, keep_rate=1.0)))
    } for gap in gaps]


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
        log.warning(
            "no exact counts (%s): resample can only sample by probability (--mode bernoulli)",
            error)
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
