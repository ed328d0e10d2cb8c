"""The largest keep rate for which the M4 constraints can hold: a linear program solved by HiGHS.

Used to answer `keep_rate="max"` and to explain an infeasible request (which constraints bind).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import scipy.optimize
import scipy.sparse as sp

from solvers.problem import BalanceProblem

# A requested rate this far above the LP's maximum is still solved (HiGHS's primal tolerance is
# 1e-7 in counts; the solvers meet the rate to 1e-9), anything beyond it is infeasible.
FEASIBILITY_SLACK = 1e-7
# A constraint row whose LP multiplier (per unit of rate) is above this is reported as binding:
# HiGHS's dual feasibility tolerance is 1e-7, so smaller multipliers are rounding noise.
BINDING_MULTIPLIER = 1e-7


@dataclasses.dataclass
class MaxRate:
    """The LP's answer: the rate, the plan that reaches it, and the constraint rows that stop it."""

    rate: float
    q: np.ndarray
    # constraint rows (upper rows 0..U-1, lower rows U..2U-1), strongest first
    binding_rows: list[int]
    multipliers: np.ndarray  # d rate / d b_j per constraint row (>= 0)


def max_keep_rate(problem: BalanceProblem) -> float:
    """Largest eta such that some 0 <= q <= 1 with sum w q = eta W meets every constraint."""
    return solve_max_rate(problem).rate


def solve_max_rate(problem: BalanceProblem) -> MaxRate:
    """maximise (1/W) sum_i w_i q_i  s.t.  0 <= q <= 1,  C^T (w q) <= W b  (DESIGN.md, "max rate").

    The result is cached on the problem: the solvers and the error message ask for it repeatedly.
    """
    cached = getattr(problem, "_max_rate", None)
    if cached is not None:
        return cached
    C, b = problem.constraint_matrix()
    w = problem.weights
    W = problem.total_weight
    # Rows are written in counts (not divided by W) so HiGHS's absolute tolerances stay meaningful.
    weighted_constraints = sp.csr_matrix(C.T @ sp.diags(w))
    result = scipy.optimize.linprog(
        c=-w / W, A_ub=weighted_constraints, b_ub=W * b, bounds=(0.0, 1.0), method="highs")
    if result.status != 0:
        raise RuntimeError(f"the max-rate LP failed: {result.message}")
    q = np.clip(result.x, 0.0, 1.0)
    # linprog reports d(objective)/d(b_ub) <= 0 for a minimisation; in rate per unit of W b_j it is
    # the gain in rate from loosening row j, scaled by W so it reads per unit of the moment.
    multipliers = np.maximum(-np.asarray(result.ineqlin.marginals, dtype=np.float64), 0.0) * W
    order = np.argsort(-multipliers, kind="stable")
    binding = [int(j) for j in order if multipliers[j] > BINDING_MULTIPLIER]
    # "+ 0.0" turns HiGHS's -0.0 into 0.0, so messages never say "at most -0".
    answer = MaxRate(rate=float(min(max(-result.fun, 0.0), 1.0)) + 0.0, q=q, binding_rows=binding,
                     multipliers=multipliers)
    problem._max_rate = answer
    return answer
