"""One entry point to the M4 solvers: `solve(problem, method=...)`.

It compresses rows into signatures, resolves keep_rate="max", explains infeasible requests and
hands back q for the original rows.
"""
from __future__ import annotations

import contextlib
import time

import numpy as np

from solvers.max_rate import FEASIBILITY_SLACK
from solvers.problem import SHARE_TOLERANCE, BalanceProblem, check_keep_rate
from solvers.solution import BalanceSolution

METHODS = ("dual", "exact", "streaming")
# "optimal" promises every constraint within this, in the user's units: a share (DESIGN.md,
# "Certificates"), or the moment form's own units (the solvers' tolerance there).
CERTIFIED_TOLERANCE = {"share": SHARE_TOLERANCE, "moment": 1e-6}
DEFAULT_METHOD = "dual"
# keep_rate="max" solves this far below the LP's rate. At the LP's rate itself the feasible set is a
# point and the dual's multipliers grow without bound: 1e-7 below it the dual solver ran 20,000
# iterations on a 34-signature problem without closing a 2.6e-6 relative gap; 1e-5 below it,
# 275 iterations (0.3 s). One keep in 100,000 is the price.
MAX_RATE_BACKOFF = 1e-5


@contextlib.contextmanager
def one_blas_thread():
    """BLAS (NumPy's products and linear solves) on one thread within: the same q on every machine.

    OpenBLAS splits a product or a factorisation across its threads, one per core, and a different
    split adds in a different order. The dual's Newton steps then move by a few ulps, the integer
    program rounds to other whole counts, and the release changes with the machine's core count: a
    1M-caption plan kept 888,620 rows with two BLAS threads and 888,623 with one. On problems of
    balance's size one thread solves as fast (the second only spins). Processor families whose
    OpenBLAS kernels differ can still differ in the last bits.
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, user_api="blas"):
        yield


def solve(problem: BalanceProblem, method: str = DEFAULT_METHOD, *, keep_rate=None,
          compress: bool = True, check_feasibility: bool = True, **options) -> BalanceSolution:
    """Solve M4 with `method` ("dual", "exact" or "streaming"); extra options go to that solver.

    keep_rate: None (the problem's), a number in (0, 1] or "max" (the largest feasible rate, from
    an LP). A rate above the achievable one raises `InfeasibleError` naming the binding constraints.
    compress: solve on unique signatures (exact, much smaller) and expand q back to the rows.
    BLAS runs on one thread meanwhile (`one_blas_thread`): q does not depend on the core count.
    """
    with one_blas_thread():
        return _solve(problem, method, keep_rate, compress, check_feasibility, options)


def _solve(problem, method, keep_rate, compress, check_feasibility, options) -> BalanceSolution:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    solver = _solver(method)
    started = time.perf_counter()
    inverse = None
    target = problem
    if compress:
        from solvers.compress import compress_problem

        target, inverse = compress_problem(problem)
    requested = check_keep_rate(problem.keep_rate if keep_rate is None else keep_rate)
    statistics = {"keep_rate_requested": requested}
    if requested == "max" or check_feasibility:
        from solvers.max_rate import max_keep_rate

        highest = max_keep_rate(target)
        statistics["max_keep_rate"] = highest
        if requested == "max":
            eta = max(highest - MAX_RATE_BACKOFF, 0.0)
        else:
            eta = float(requested)
            if eta > highest + FEASIBILITY_SLACK:
                from solvers.errors import explain_infeasible

                raise explain_infeasible(target, eta)
    else:
        eta = float(requested)
    if not eta > 0:
        from solvers.errors import explain_infeasible

        raise explain_infeasible(target, 1.0)

    solution = solver(target, keep_rate=eta, **options)
    if solution.q is not None:  # every method certified alike, in the user's units
        statistics["certified_violation"] = target.certified_violation(solution.q)
        if solution.status == "optimal" and statistics["certified_violation"] > CERTIFIED_TOLERANCE[
                target.spec.constraint_form]:
            solution.status = "not_converged"
    statistics["signatures"] = target.num_rows
    statistics["rows"] = problem.num_rows
    statistics["total_seconds"] = time.perf_counter() - started
    solution.statistics = {**solution.statistics, **statistics}
    if inverse is not None and solution.q is not None:
        solution.q = np.asarray(solution.q)[inverse]
    return solution


def _solver(method: str):
    """The solver function, imported only when asked (cvxpy is slow to import)."""
    if method == "exact":
        from solvers.exact import solve_exact

        return solve_exact
    if method == "dual":
        from solvers.dual import solve_dual

        return solve_dual
    from solvers.streaming import solve_streaming

    return solve_streaming
