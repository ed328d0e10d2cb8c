"""Streaming M4 solver: mini-batch stochastic dual ascent over an iterator of batches (O(d) memory).

For data that neither fits in memory nor compresses: the paper's M4 regime (DESIGN.md, "streaming").
"""
from __future__ import annotations

import time
from typing import Callable, Iterable, Iterator

import numpy as np

from solvers import progress as progress_bars
from solvers.problem import (DEFAULT_MIN_SUPPORT, BalanceProblem, check_keep_rate,
                             resolve_keep_rate)
from solvers.spec import REPRESENTATION, ConstraintSpec
from solvers.solution import BalanceSolution

# One batch: (attributes (n, m) 0/1, concepts (n, c) 0/1, weights (n,) or None, utility (n,) or
# None).
Batch = tuple
BatchesFactory = Callable[[], Iterable[Batch]]

DEFAULT_BATCH_SIZE = 16_384
DEFAULT_EPOCHS = 4
# Step length in the metric of the diagonal curvature bound: 1 is the largest step that a full
# (deterministic) gradient may take; mini-batch noise asks for less (measured in docs/solvers.md).
DEFAULT_STEP = 0.5
DEFAULT_MOMENTUM = 0.5
# After the ascent, this many passes with lambda fixed correct nu so the kept fraction is eta
# (safeguarded Newton on the rate equation); the last of them also measures the certificates.
DEFAULT_RATE_PASSES = 2


def solve_streaming(problem: BalanceProblem, keep_rate=None, batch_size: int = DEFAULT_BATCH_SIZE,
                    epochs: int = DEFAULT_EPOCHS, seed: int = 0, step: float = DEFAULT_STEP,
                    rate_passes: int = DEFAULT_RATE_PASSES,
                    progress: bool = False) -> BalanceSolution:
    """Streaming solve of an in-memory problem: its rows, shuffled by `seed`, in mini-batches.

    Same seed, same result. The returned solution carries q for the problem's rows.
    """
    keep_rate = resolve_keep_rate(problem, keep_rate)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(problem.num_rows)

    def batches() -> Iterator[Batch]:
        for start in range(0, problem.num_rows, batch_size):
            rows = order[start:start + batch_size]
            yield (problem.attributes[rows], problem.concepts[rows], problem.weights[rows],
                   None if problem.utility is None else problem.utility[rows])

    tilt = problem.utility_tilt if problem.utility is not None else 0.0
    solution = solve_stream(problem.spec, batches, keep_rate, utility_tilt=tilt, epochs=epochs,
                            step=step, rate_passes=rate_passes, progress=progress)
    solution.q = solution.q_for(problem.attributes, problem.concepts, problem.utility)
    solution.objective = problem.objective(solution.q, keep_rate)
    solution.statistics.update(batch_size=batch_size, seed=seed)
    return solution


def solve_stream(spec: ConstraintSpec, batches_factory: BatchesFactory, keep_rate: float, *,
                 utility_tilt: float = 0.0, epochs: int = DEFAULT_EPOCHS,
                 step: float = DEFAULT_STEP, rate_passes: int = DEFAULT_RATE_PASSES,
                 variance_reduction: bool = True, momentum: float = DEFAULT_MOMENTUM,
                 progress: bool = False) -> BalanceSolution:
    """Solve M4 over a stream: `batches_factory()` returns a fresh iterator of batches each pass.

    Passes: one for totals (W, mean utility, a diagonal curvature bound), `epochs` of stochastic
    projected dual ascent with iterate averaging over the last epoch, then `rate_passes` that fix
    nu so the rate is met and measure the certificates. Memory: one batch plus O(d).
    """
    started = time.perf_counter()
    keep_rate = check_keep_rate(keep_rate)
    if keep_rate == "max":
        raise ValueError(
            "solve_stream needs a number for keep_rate; solve_streaming resolves 'max' from a "
            "problem"
        )
    if epochs < 1 or rate_passes < 1:
        raise ValueError("epochs and rate_passes must be >= 1")
    totals = _stream_totals(spec, batches_factory)
    if totals["weight"] <= 0:
        raise ValueError("the stream has no rows")
    utility_mean = totals["utility_sum"] / totals["weight"] if utility_tilt else 0.0

    def batch_terms(batch):
        attributes, concepts, weights, utility = _unpack(batch)
        matrix, _ = spec.constraint_matrix(attributes, concepts)
        targets = np.full(matrix.shape[0], keep_rate)
        if utility_tilt:
            if utility is None:
                raise ValueError("utility_tilt > 0 needs a utility column in every batch")
            targets += utility_tilt * (utility - utility_mean)
        return matrix, weights, targets

    bounds = _constraint_bounds(spec)
    curvature, rate_curvature = totals["curvature"], totals["rate_curvature"]
    lam, nu = np.zeros(spec.num_constraints), 0.0
    average_lam, average_nu, averaged = np.zeros_like(lam), 0.0, 0
    steps = 0
    bar = progress_bars.bar(progress, epochs + rate_passes + 1, "M4 streaming", "pass")
    # Variance reduction with a lagged snapshot (SVRG-style, one pass per epoch): the step uses
    # g_b(x) - g_b(x_prev) + G(x_prev), where G(x_prev) is the full gradient at the point the
    # previous epoch started from, summed during that epoch; the first epoch is plain SGD.
    previous_snapshot = previous_gradient = None
    lam_velocity, nu_velocity = np.zeros_like(lam), 0.0
    for epoch in range(epochs):
        snapshot = (lam.copy(), nu)
        snapshot_gradient = (np.zeros_like(lam), 0.0)
        for batch in batches_factory():
            matrix, weights, targets = batch_terms(batch)
            batch_weight = float(weights.sum())
            lam_step, nu_step = _batch_gradient(matrix, weights, targets, lam, nu)
            if variance_reduction:
                at_snapshot = _batch_gradient(matrix, weights, targets, *snapshot)
                snapshot_gradient = (snapshot_gradient[0] + at_snapshot[0],
                                     snapshot_gradient[1] + at_snapshot[1])
                if previous_snapshot is not None:
                    at_previous = _batch_gradient(matrix, weights, targets, *previous_snapshot)
                    lam_step = lam_step - at_previous[0] + batch_weight * previous_gradient[0]
                    nu_step = nu_step - at_previous[1] + batch_weight * previous_gradient[1]
            # Heavy-ball momentum: the dual is ill-conditioned (rare concepts have little
            # curvature).
            lam_velocity = (momentum * lam_velocity
                            + step * (lam_step / batch_weight - bounds) / curvature)
            nu_velocity = (momentum * nu_velocity
                           + step * (nu_step / batch_weight - keep_rate) / rate_curvature)
            updated = np.maximum(lam + lam_velocity, 0.0)
            lam_velocity, lam = updated - lam, updated
            nu += nu_velocity
            steps += 1
            if epoch == epochs - 1:  # Polyak-Ruppert averaging over the last epoch
                averaged += 1
                average_lam += (lam - average_lam) / averaged
                average_nu += (nu - average_nu) / averaged
        previous_snapshot = snapshot
        previous_gradient = (snapshot_gradient[0] / totals["weight"],
                             snapshot_gradient[1] / totals["weight"])
        if bar is not None:
            bar.update(1)
    lam, nu = average_lam, average_nu

    for rate_pass in range(rate_passes):
        measured = _measure(batches_factory, batch_terms, lam, nu, bounds, totals["weight"])
        if rate_pass < rate_passes - 1 and measured["free_weight"] > 0:
            nu += (measured["kept_share"] - keep_rate) / measured["free_weight"]
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()

    violation = max(float(measured["violations"].max(initial=0.0)),
                    abs(measured["kept_share"] - keep_rate))
    return BalanceSolution(
        spec=spec,
        keep_rate=keep_rate,
        constraint_duals=lam,
        rate_dual=float(nu),
        utility_tilt=float(utility_tilt),
        utility_mean=float(utility_mean),
        q=None,
        objective=measured["objective"] * totals["weight"],
        max_violation=violation,
        status="approximate",
        method="streaming",
        statistics={
            "epochs": epochs,
            "steps": steps,
            "step": step,
            "rate_passes": rate_passes,
            "rows": totals["rows"],
            "total_weight": totals["weight"],
            "kept_share": measured["kept_share"],
            "max_constraint_violation": float(measured["violations"].max(initial=0.0)),
            "seconds": time.perf_counter() - started,
        },
    )


def stream_spec(batches_factory: BatchesFactory, *, groups=None, targets="uniform",
                representation_gap=None, association_gap=None, constraint_form: str = "share",
                min_support: float = DEFAULT_MIN_SUPPORT, conditional: bool = True,
                attribute_names=None, concept_names=None, group_names=None) -> ConstraintSpec:
    """The `ConstraintSpec` BalanceProblem would build from these rows, from one pass of weighted
    sums.

    Same options and the same rules as `BalanceProblem` ("preserve" targets, min_support), without
    holding the rows: it needs only sum w s_k, sum w a_g and the supports sum w a_g y_r.
    """
    present = annotated_weight = support = None
    for batch in batches_factory():
        attributes, concepts, weights, _ = _unpack(batch)
        attributes = np.asarray(attributes, dtype=np.float64)
        concepts = np.asarray(concepts, dtype=np.float64)
        if present is None:
            column_groups = [list(range(attributes.shape[1]))
                             ] if groups is None else [list(g) for g in groups]
            spec = ConstraintSpec(column_groups, [], constraint_form, bool(conditional), [], [], [],
                                  [], [], [])
            present, annotated_weight = np.zeros(attributes.shape[1]), np.zeros(len(column_groups))
            support = np.zeros((len(column_groups), concepts.shape[1]))
        annotated = spec.annotated(attributes)
        present += weights @ attributes
        annotated_weight += weights @ annotated
        support += (annotated * weights[:, None]).T @ concepts
    if present is None:
        raise ValueError("the stream has no rows")
    # A two-row stand-in with the stream's sums lets BalanceProblem check and resolve everything
    # that does not depend on single rows (names, groups, gaps, explicit targets).
    num_values, num_concepts = len(present), support.shape[1]
    stand_in = BalanceProblem(np.vstack([np.ones(num_values), np.zeros(num_values)]),
                              np.vstack([np.ones(num_concepts), np.zeros(num_concepts)]),
                              groups=groups,
                              targets="uniform" if isinstance(targets, str) else targets,
                              representation_gap=representation_gap,
                              association_gap=association_gap, constraint_form=constraint_form,
                              min_support=0, conditional=conditional,
                              attribute_names=attribute_names, concept_names=concept_names,
                              group_names=group_names)
    result = stand_in.spec
    group_of = result.value_group()
    if isinstance(targets, str) and targets == "preserve":
        result.targets = (present / annotated_weight[group_of]).tolist()
    if (annotated_weight == 0).any():
        empty = [result.group_names[g] for g in np.flatnonzero(annotated_weight == 0)]
        raise ValueError(f"no row has any value of attribute group(s) {empty}: nothing to balance")
    kept = [u for u in range(result.num_units) if result.unit_concepts[u] == REPRESENTATION
            or (support[group_of[result.unit_values[u]], result.unit_concepts[u]] >= min_support
                and support[group_of[result.unit_values[u]], result.unit_concepts[u]] > 0)]
    result.unit_values = [result.unit_values[u] for u in kept]
    result.unit_concepts = [result.unit_concepts[u] for u in kept]
    result.unit_gaps = [result.unit_gaps[u] for u in kept]
    return result


def _batch_gradient(matrix, weights, targets, lam, nu) -> tuple[np.ndarray, float]:
    """(C_b^T (w q), sum w q) of one batch at (lambda, nu): the dual gradient's sums, unnormalised.
    """
    weighted = weights * np.clip(targets - matrix @ lam - nu, 0.0, 1.0)
    return matrix.T @ weighted, float(weighted.sum())


def _stream_totals(spec: ConstraintSpec, batches_factory: BatchesFactory) -> dict:
    """One pass: rows, W, sum w u and the Gershgorin bound of the dual's curvature per unit weight.

    The dual's Hessian in (lambda, nu) is at most (1/W) [C 1]^T W [C 1]; its absolute row sums
    (1/W) sum_i w_i |C_ij| (sum_k |C_ik| + 1) bound it from above, coordinate by coordinate.
    """
    rows, weight, utility_sum = 0, 0.0, 0.0
    curvature, rate_curvature = np.zeros(spec.num_constraints), 0.0
    for batch in batches_factory():
        attributes, concepts, weights, utility = _unpack(batch)
        matrix, _ = spec.constraint_matrix(attributes, concepts)
        absolute = abs(matrix)
        row_mass = np.asarray(absolute.sum(axis=1)).ravel() + 1.0
        curvature += absolute.T @ (weights * row_mass)
        rate_curvature += float((weights * row_mass).sum())
        rows += len(weights)
        weight += float(weights.sum())
        if utility is not None:
            utility_sum += float((weights * utility).sum())
    if weight > 0:
        curvature /= weight
        rate_curvature /= weight
    floor = 1e-12 * max(curvature.max(initial=0.0), 1.0)
    return {"rows": rows, "weight": weight, "utility_sum": utility_sum,
            "curvature": np.maximum(curvature, floor), "rate_curvature": max(rate_curvature, floor)}


def _measure(batches_factory, batch_terms, lam, nu, bounds, total_weight) -> dict:
    """One pass at fixed (lambda, nu): kept share, free weight, violations, objective per unit
    weight."""
    moments = np.zeros_like(bounds)
    kept = free = objective = 0.0
    for batch in batches_factory():
        matrix, weights, targets = batch_terms(batch)
        excess = targets - matrix @ lam - nu
        q = np.clip(excess, 0.0, 1.0)
        weighted = weights * q
        moments += matrix.T @ weighted
        kept += float(weighted.sum())
        free += float(weights[(excess > 0) & (excess < 1)].sum())
        objective += 0.5 * float((weights * (q - targets) ** 2).sum())
    return {"kept_share": kept / total_weight, "free_weight": free / total_weight,
            "violations": np.maximum(moments / total_weight - bounds, 0.0),
            "objective": objective / total_weight}


def _constraint_bounds(spec: ConstraintSpec) -> np.ndarray:
    """b of the canonical form: 0 for share gaps, the gaps themselves for moments (problem.py)."""
    if spec.constraint_form == "share":
        return np.zeros(spec.num_constraints)
    gaps = np.asarray(spec.unit_gaps, dtype=np.float64)
    return np.concatenate([gaps, gaps])


def _unpack(batch):
    attributes, concepts, weights, utility = batch
    rows = np.shape(attributes)[0]
    weights = np.ones(rows) if weights is None else np.asarray(weights, dtype=np.float64)
    if weights.shape != (rows,) or not np.isfinite(weights).all() or (weights <= 0).any():
        raise ValueError(f"batch weights must be {rows} positive finite numbers")
    if utility is not None:
        utility = np.asarray(utility, dtype=np.float64)
        if utility.shape != (rows,) or not np.isfinite(utility).all():
            raise ValueError(f"batch utility must be {rows} finite numbers")
    return attributes, concepts, weights, utility
