"""The reference M4 solver: the quadratic program of DESIGN.md written in cvxpy, solved exactly.

Other solvers (dual, streaming) are checked against it; it also recovers the duals (lambda, nu).
"""
from __future__ import annotations

import time

import cvxpy as cp
import numpy as np

from solvers.problem import SHARE_TOLERANCE, BalanceProblem, resolve_keep_rate
from solvers.solution import BalanceSolution

DEFAULT_SOLVER = "CLARABEL"
# Clarabel's defaults (1e-8) leave the recovered duals ~1e-5 off in q on 3,000-row problems; 1e-10
# brings q_for(duals) to ~1e-7 of the primal q for one or two extra interior-point iterations.
CLARABEL_REFERENCE_TOLERANCES = {
    "tol_gap_abs": 1e-10, "tol_gap_rel": 1e-10, "tol_feas": 1e-10, "tol_ktratio": 1e-8
}
# cvxpy statuses that mean "a solution is there" (the inaccurate ones are kept but reported).
SOLVED_STATUSES = (cp.OPTIMAL, cp.OPTIMAL_INACCURATE)
INFEASIBLE_STATUSES = (cp.INFEASIBLE, cp.INFEASIBLE_INACCURATE)


def solve_exact(problem: BalanceProblem, keep_rate=None, solver: str = DEFAULT_SOLVER,
                verbose: bool = False, **solver_options) -> BalanceSolution:
    """Solve M4 with cvxpy and a real conic/QP solver (Clarabel by default; OSQP, SCS, HIGHS too).

    The returned duals satisfy q = clip(t - C lambda - nu, 0, 1) at the optimum, so the solution
    applies to rows it has never seen (`BalanceSolution.q_for`).
    """
    eta = resolve_keep_rate(problem, keep_rate)
    solver = solver.upper()
    if solver not in cp.installed_solvers():
        raise ValueError(
            f"solver {solver!r} is not installed; installed: {', '.join(cp.installed_solvers())}")
    C, b = problem.constraint_matrix()  # (N, J) sparse, (J,)
    w = problem.weights
    W = problem.total_weight
    t = problem.keep_targets(eta)
    d = row_scales(problem)  # (J,): each row in units of its concept's support (share form), else 1

    # DESIGN.md, "M4 as an optimisation problem", line by line.
    q = cp.Variable(problem.num_rows, name="keep_probability")
    # 1/2 sum w (q - t)^2
    objective = cp.Minimize(0.5 * cp.sum_squares(cp.multiply(np.sqrt(w), q - t)))
    bounds = [q >= 0, q <= 1]                                                        # 0 <= q <= 1
    # sum w q = eta W
    rate = w @ q == eta * W
    # (1/W) C^T (w q) <= b
    moments = cp.multiply(d, C.T @ cp.multiply(w, q)) / W <= cp.multiply(d, b)
    program = cp.Problem(objective, bounds + [rate, moments])

    if solver == "CLARABEL":
        solver_options = {**CLARABEL_REFERENCE_TOLERANCES, **solver_options}
    started = time.perf_counter()
    try:
        program.solve(solver=solver, verbose=verbose, **solver_options)
    except cp.SolverError as error:
        raise RuntimeError(f"{solver} failed on the M4 problem ({problem.num_rows} rows, "
                           f"{len(b)} constraints): {error}") from error
    seconds = time.perf_counter() - started

    if program.status in INFEASIBLE_STATUSES:
        # errors imports max_rate, which imports cvxpy users
        from solvers.errors import explain_infeasible
        raise explain_infeasible(problem, eta)
    if program.status not in SOLVED_STATUSES or q.value is None:
        raise RuntimeError(f"{solver} returned status '{program.status}' on the M4 problem")

    # Stationarity of row i: w_i (q_i - t_i) + (w_i / W) (C D mu)_i + nu w_i = 0 with mu the dual of
    # the scaled `moments` and nu that of `rate`; so lambda = D mu / W in q = clip(t - C lambda -
    # nu, 0, 1).
    constraint_duals = (
        d * np.maximum(np.asarray(moments.dual_value, dtype=np.float64).reshape(-1), 0.0) / W
    )
    rate_dual = float(np.asarray(rate.dual_value).reshape(()))
    keep_probability = np.clip(np.asarray(q.value, dtype=np.float64), 0.0, 1.0)
    objective_value = problem.objective(keep_probability, eta)
    dual_value = dual_objective(problem, eta, constraint_duals, rate_dual)
    stats = program.solver_stats
    certified = problem.certified_violation(keep_probability)
    status = program.status
    share_form = problem.spec.constraint_form == "share"
    if status == cp.OPTIMAL and share_form and certified > SHARE_TOLERANCE:
        status = cp.OPTIMAL_INACCURATE  # the solver's tolerance, not the user's gap, was met
    return BalanceSolution(
        spec=problem.spec,
        keep_rate=eta,
        constraint_duals=constraint_duals,
        rate_dual=rate_dual,
        utility_tilt=problem.utility_tilt,
        utility_mean=problem.utility_mean,
        q=keep_probability,
        objective=objective_value,
        max_violation=max_violation(problem, keep_probability, eta),
        duality_gap=(objective_value - dual_value) / max(abs(objective_value), 1.0),
        status=status,
        method="exact",
        statistics={
            "solver": solver,
            "solve_seconds": seconds,
            "solver_seconds": getattr(stats, "solve_time", None),
            "iterations": getattr(stats, "num_iters", None),
            "rows": problem.num_rows,
            "constraint_rows": int(len(b)),
            "total_weight": W,
            "certified_violation": certified,
        },
    )


def row_scales(problem: BalanceProblem) -> np.ndarray:
    """A factor per constraint row so that each reads in units of its own concept's annotated
    support.

    In (1/W) units a small concept's rows are tiny next to the solver's absolute tolerances (W =
    1e9, support 50: 1e-10 is 2 in share), so each share-form row is multiplied by W / support: the
    same constraint, the tolerance now in shares. Moment-form rows are the user's own units
    and stay.
    """
    if problem.spec.constraint_form != "share":
        return np.ones(problem.spec.num_constraints)
    support = problem.unit_supports(np.ones(problem.num_rows))
    scale = problem.total_weight / np.maximum(support, 1e-300)
    return np.concatenate([scale, scale])


def max_violation(problem: BalanceProblem, q: np.ndarray, keep_rate: float) -> float:
    """Largest violation of any constraint, in the problem's units: moments, rate |w.q/W - eta|,
    bounds."""
    moment_violation = float(problem.violations(q).max(initial=0.0))
    rate_error = abs(float(problem.weights @ q) / problem.total_weight - keep_rate)
    bound_violation = float(max(-q.min(initial=0.0), q.max(initial=0.0) - 1.0, 0.0))
    return max(moment_violation, rate_error, bound_violation)


def dual_objective(
    problem: BalanceProblem, keep_rate: float, constraint_duals: np.ndarray, rate_dual: float
) -> float:
    """Lagrange dual function at (lambda, nu): a lower bound on the optimum for any lambda >= 0.

    L(q, lambda, nu) = 1/2 sum w (q - t)^2 + lambda.(C^T (w q) - W b) + nu (sum w q - eta W),
    minimised over 0 <= q <= 1 by q = clip(t - C lambda - nu, 0, 1).
    """
    C, b = problem.constraint_matrix()
    w = problem.weights
    W = problem.total_weight
    t = problem.keep_targets(keep_rate)
    lam = np.maximum(constraint_duals, 0.0)
    shift = C @ lam
    q = np.clip(t - shift - rate_dual, 0.0, 1.0)
    return float(
        0.5 * w @ (q - t) ** 2 + w @ (q * shift) - W * lam @ b + rate_dual * (w @ q - keep_rate * W)
    )
