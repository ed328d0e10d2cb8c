"""Dual solver for M4: accelerated projected gradient on the concave dual, then Newton polishing.

Works on the d-dimensional dual (lambda >= 0, one per constraint row, plus the rate multiplier nu,
found exactly by a 1-D search at every step); stops on certificates (DESIGN.md, "M4", "dual").
"""
from __future__ import annotations

import time
import warnings

import numpy as np
import scipy.sparse as sp

from solvers import progress as progress_bars
from solvers.max_rate import FEASIBILITY_SLACK
from solvers.problem import SHARE_TOLERANCE, BalanceProblem, resolve_keep_rate
from solvers.solution import BalanceSolution

# The issue asks for max violation <= 1e-6 (problem units) and objective within 1e-4 of the exact
# optimum; stopping a decade below both leaves room for the exact solver's own tolerance.
DEFAULT_TOLERANCE = 1e-7
DEFAULT_MAX_ITERATIONS = 20_000
# Accelerated gradient runs this many steps between attempts at Newton polishing; the dual has
# a few hundred variables, so an attempt costs about as much as a handful of gradient steps.
POLISH_EVERY = 25
POLISH_NEWTON_STEPS = 12
LINE_SEARCH_HALVINGS = 30
# The rate equation sum_i w_i q_i = eta W is solved to this relative accuracy (machine level).
RATE_RELATIVE_TOLERANCE = 1e-13
RATE_MAX_EVALUATIONS = 200
# Tikhonov term (relative to the Hessian's diagonal) that keeps Newton systems solvable when
# constraint rows are linearly dependent (e.g. zero share gaps: upper and lower rows coincide).
NEWTON_REGULARISATION = 1e-12
# An infeasible problem has an unbounded dual: when the violation has not halved over this many
# iterations, the max-rate LP decides (once) whether the keep rate is out of reach.
STALL_CHECK_EVERY = 200


def solve_rate_multiplier(shift: np.ndarray, weights: np.ndarray, target_sum: float,
                          start: float = 0.0):
    """nu with sum_i w_i clip(shift_i - nu, 0, 1) = target_sum, by safeguarded Newton steps.

    The left side is piecewise linear and non-increasing in nu; a Newton step on the current
    linear piece is exact once the piece is right, and bisection on the bracket guarantees
    progress otherwise. Returns (nu, q).
    """
    lower, upper = float(shift.min()) - 1.0, float(shift.max())  # all kept / none kept
    nu = min(max(start, lower), upper)
    scale = max(target_sum, 1e-300)
    for _ in range(RATE_MAX_EVALUATIONS):
        excess = shift - nu
        keep = np.clip(excess, 0.0, 1.0)
        residual = float((weights * keep).sum()) - target_sum  # not BLAS: its threads wake slowly
        if abs(residual) <= RATE_RELATIVE_TOLERANCE * scale:
            break
        if residual > 0:
            lower = nu
        else:
            upper = nu
        free_weight = float(weights[(excess > 0) & (excess < 1)].sum())
        candidate = nu + residual / free_weight if free_weight > 0 else np.nan
        if not lower < candidate < upper:
            candidate = 0.5 * (lower + upper)
        if candidate == nu or upper - lower <= 4 * np.finfo(float).eps * max(1.0, abs(nu)):
            break
        nu = candidate
    return nu, keep


class DualOracle:
    """Value and gradient of the M4 dual, per unit of total weight, at lambda (nu eliminated).

    phi(lambda) = max over nu of (1/W) L(q(lambda, nu), lambda, nu); its gradient in lambda is the
    constraint residual (1/W) C^T (w q) - b. Rows with no constraint coefficient (unannotated rows)
    only enter the rate equation; rows among them with equal keep targets merge exactly.
    """

    def __init__(self, matrix: sp.csr_matrix, bounds: np.ndarray, weights: np.ndarray,
                 targets: np.ndarray, keep_rate: float):
        matrix = sp.csr_matrix(matrix)
        self.num_rows = matrix.shape[0]
        self.constrained = np.diff(matrix.indptr) > 0
        self.matrix = matrix[self.constrained]
        self.matrix_t = self.matrix.T.tocsr()
        self.bounds = np.asarray(bounds, dtype=np.float64)
        self.total_weight = float(weights.sum())
        self.keep_rate = float(keep_rate)
        free_targets, self.free_inverse = np.unique(targets[~self.constrained], return_inverse=True)
        free_weights = np.bincount(self.free_inverse, weights=weights[~self.constrained],
                                   minlength=len(free_targets))
        self.num_constrained = int(self.constrained.sum())
        self.targets = np.concatenate([targets[self.constrained], free_targets])
        self.weights = np.concatenate([weights[self.constrained], free_weights])
        self.evaluations = 0

    @property
    def dimension(self) -> int:
        return self.matrix.shape[1]

    def evaluate(self, lam: np.ndarray, nu_start: float) -> dict:
        """q, nu, dual value, primal objective and gradient (all per unit weight) at lambda."""
        self.evaluations += 1
        shift = self.targets.copy()
        shift[: self.num_constrained] -= self.matrix @ lam
        nu, q = solve_rate_multiplier(shift, self.weights, self.keep_rate * self.total_weight,
                                      nu_start)
        weighted = self.weights * q
        gradient = self.matrix_t @ weighted[:self.num_constrained] / self.total_weight - self.bounds
        rate_residual = weighted.sum() / self.total_weight - self.keep_rate
        primal = 0.5 * float((self.weights * (q - self.targets) ** 2).sum()) / self.total_weight
        dual = primal + float(lam @ gradient) + nu * rate_residual
        return {"lam": lam, "nu": nu, "q": q, "shift": shift, "gradient": gradient, "dual": dual,
                "primal": primal, "rate_residual": rate_residual}

    def diagonal_majoriser(self) -> np.ndarray:
        """Row sums of |C|^T W |C| / W (Gershgorin): a diagonal upper bound of the dual's curvature.
        """
        absolute = abs(self.matrix)
        row_mass = np.asarray(absolute.sum(axis=1)).ravel()
        bound = absolute.T @ (self.weights[: self.num_constrained] * row_mass) / self.total_weight
        return np.maximum(bound, 1e-12 * max(bound.max(initial=0.0), 1e-300))

    def full_q(self, q: np.ndarray) -> np.ndarray:
        """Keep probabilities of all original rows from the oracle's compact q."""
        result = np.empty(self.num_rows)
        result[self.constrained] = q[: self.num_constrained]
        result[~self.constrained] = q[self.num_constrained:][self.free_inverse]
        return result


def certificates(point: dict) -> tuple[float, float]:
    """(max constraint violation in the problem's units, relative duality gap) at an oracle point.
    """
    violation = max(float(np.max(point["gradient"], initial=0.0)), abs(point["rate_residual"]))
    gap = point["primal"] - point["dual"]
    return violation, abs(gap) / max(abs(point["primal"]), 1e-12)


def newton_polish(oracle: DualOracle, point: dict, tolerance: float) -> dict:
    """Projected semismooth Newton steps on the dual, each verified by a line search.

    With F the rows strictly inside (0, 1) and I the constraint rows not held at lambda = 0, the
    dual is quadratic near the optimum with Hessian -(1/W) [C_FI^T W_F C_FI - c c^T / h] (nu
    eliminated; c = C_FI^T w_F, h = sum_F w): one step solves the KKT system once F and I are right.
    """
    for _ in range(POLISH_NEWTON_STEPS):
        if max(certificates(point)) <= tolerance:
            break
        lam, gradient = point["lam"], point["gradient"]
        excess = point["shift"] - point["nu"]
        free_rows = (excess > 0) & (excess < 1)
        free_weight = float(oracle.weights[free_rows].sum())
        working = np.flatnonzero((lam > 0) | (gradient > 0))
        if working.size == 0 or free_weight <= 0:
            break
        constrained_free = np.flatnonzero(free_rows[: oracle.num_constrained])
        block = oracle.matrix[constrained_free][:, working]
        row_weights = oracle.weights[constrained_free]
        curvature = (block.T @ sp.diags(row_weights) @ block).toarray()
        coupling = block.T @ row_weights
        hessian = (curvature - np.outer(coupling, coupling) / free_weight) / oracle.total_weight
        ridge = NEWTON_REGULARISATION * max(float(np.trace(hessian)) / len(working), 1e-300)
        try:
            step = np.linalg.solve(hessian + ridge * np.eye(len(working)), gradient[working])
        except np.linalg.LinAlgError:
            step = np.linalg.lstsq(hessian, gradient[working], rcond=None)[0]
        direction = np.zeros_like(lam)
        direction[working] = step
        accepted = None
        size = 1.0
        for _ in range(LINE_SEARCH_HALVINGS):
            candidate = oracle.evaluate(np.maximum(lam + size * direction, 0.0), point["nu"])
            if candidate["dual"] >= point["dual"] - 1e-15 * max(abs(point["dual"]), 1e-300):
                accepted = candidate
                break
            size *= 0.5
        if accepted is None:
            break
        point = accepted
    return point


def solve_dual(problem: BalanceProblem, keep_rate=None, tolerance: float = DEFAULT_TOLERANCE,
               max_iterations: int = DEFAULT_MAX_ITERATIONS,
               progress: bool = False) -> BalanceSolution:
    """Solve M4 through its dual: FISTA with adaptive restart, exact nu, Newton polishing.

    Stops when the max constraint violation (problem units) and the relative duality gap are both
    <= tolerance; the solution carries lambda and nu so `q_for` applies it to unseen rows.
    """
    started = time.perf_counter()
    keep_rate = resolve_keep_rate(problem, keep_rate)
    matrix, bounds = problem.constraint_matrix()
    oracle = DualOracle(matrix, bounds, problem.weights, problem.keep_targets(keep_rate), keep_rate)
    step_scale = oracle.diagonal_majoriser()  # diagonal metric: step_j = 1 / step_scale_j

    lam = np.zeros(oracle.dimension)
    best = oracle.evaluate(lam, keep_rate)
    needed = _violation_tolerance(problem, oracle, best, tolerance)
    extrapolated, momentum, nu = lam.copy(), 1.0, best["nu"]
    iterations = restarts = polishes = 0
    checkpoint_violation, feasibility_checked = np.inf, False
    bar = progress_bars.bar(progress, max_iterations, "M4 dual", "it")
    while not _converged(best, needed, tolerance) and iterations < max_iterations:
        iterations += 1
        point = oracle.evaluate(extrapolated, nu)
        nu = point["nu"]
        updated = np.maximum(extrapolated + point["gradient"] / step_scale, 0.0)
        if float(((extrapolated - updated) * step_scale) @ (updated - lam)) > 0:  # gradient restart
            momentum, restarts = 1.0, restarts + 1
        next_momentum = 0.5 * (1.0 + np.sqrt(1.0 + 4.0 * momentum**2))
        extrapolated = updated + ((momentum - 1.0) / next_momentum) * (updated - lam)
        lam, momentum = updated, next_momentum
        if bar is not None:
            bar.update(1)
        if iterations % POLISH_EVERY and iterations != max_iterations:
            continue
        current = oracle.evaluate(lam, nu)
        if current["dual"] > best["dual"]:
            best = current
        polished = newton_polish(oracle, best, needed)
        polishes += 1
        # continue the accelerated phase from the polished point
        if polished["dual"] >= best["dual"]:
            best = polished
            lam, extrapolated, momentum = best["lam"].copy(), best["lam"].copy(), 1.0
        needed = _violation_tolerance(problem, oracle, best, tolerance)
        violation, gap = certificates(best)
        if bar is not None:
            bar.set_postfix(violation=f"{violation:.1e}", gap=f"{gap:.1e}")
        if iterations % STALL_CHECK_EVERY == 0:
            # The dual of an infeasible problem is unbounded: lambda grows and the violation
            # stalls. Ask the max-rate LP once, rather than iterating to the limit.
            if violation > 0.5 * checkpoint_violation and not feasibility_checked:
                _raise_if_infeasible(problem, keep_rate)
                feasibility_checked = True
            checkpoint_violation = violation
    if bar is not None:
        bar.close()

    violation, gap = certificates(best)
    q = oracle.full_q(best["q"])
    certified = problem.certified_violation(q)
    converged = _converged(best, needed, tolerance) and (
        problem.spec.constraint_form != "share" or certified <= SHARE_TOLERANCE)
    if not converged:
        if not feasibility_checked:
            _raise_if_infeasible(problem, keep_rate)
        warnings.warn(
            f"dual solver stopped after {iterations} iterations without meeting the tolerance "
            f"{tolerance:g} (violation {violation:.2e}, relative gap {gap:.2e}, constrained shares "
            f"off by up to {certified:.2e})", RuntimeWarning, stacklevel=2)
    return BalanceSolution(
        spec=problem.spec,
        keep_rate=keep_rate,
        constraint_duals=best["lam"],
        rate_dual=float(best["nu"]),
        utility_tilt=problem.utility_tilt if problem.utility is not None else 0.0,
        utility_mean=problem.utility_mean,
        q=q,
        objective=problem.objective(q, keep_rate),
        max_violation=float(
            max(np.max(problem.violations(q), initial=0.0), abs(best["rate_residual"]))),
        duality_gap=gap,
        status="optimal" if converged else "not_converged",
        method="dual",
        statistics={
            "iterations": iterations,
            "restarts": restarts,
            "polish_attempts": polishes,
            "oracle_evaluations": oracle.evaluations,
            "seconds": time.perf_counter() - started,
            "relative_duality_gap": gap,
            "max_violation": violation,
            "tolerance": tolerance,
            "certified_violation": certified,
            "violation_tolerance": needed,
            "rows": oracle.num_rows,
            "constrained_rows": oracle.num_constrained,
            "dual_dimension": oracle.dimension,
        },
    )


def _converged(point: dict, violation_tolerance: float, gap_tolerance: float) -> bool:
    violation, gap = certificates(point)
    return violation <= violation_tolerance and gap <= gap_tolerance


def _violation_tolerance(problem: BalanceProblem, oracle: DualOracle, point: dict,
                         tolerance: float) -> float:
    """The moment violation that certifies every constrained share to SHARE_TOLERANCE at this point.

    A moment violation v (per unit of W) moves a share by v W / K, K the unit's kept annotated
    weight: with W = 1e9 and K = 50, 1e-7 in moments is 2 in shares. So the tolerance in moments
    is SHARE_TOLERANCE times the smallest K / W (and never looser than `tolerance`).
    """
    if problem.spec.constraint_form != "share":
        return tolerance
    q = oracle.full_q(point["q"])
    present = problem.unit_supports(q)[~problem.dropped_units(q)]
    if not present.size:
        return tolerance
    return min(tolerance, SHARE_TOLERANCE * float(present.min()) / problem.total_weight)


def _raise_if_infeasible(problem: BalanceProblem, keep_rate: float) -> None:
    """Raise the readable infeasibility error when the max-rate LP says keep_rate is out of reach.
    """
    from solvers.errors import explain_infeasible  # noqa: PLC0415 (LP solver only on this path)
    from solvers.max_rate import max_keep_rate  # noqa: PLC0415

    if keep_rate > max_keep_rate(problem) + FEASIBILITY_SLACK:
        raise explain_infeasible(problem, keep_rate)
