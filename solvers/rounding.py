"""Exact counts: how many whole rows of each signature to keep so that the kept rows meet the gaps.

M4's plan keeps n_s q_s rows of signature s on average, and a release keeps whole rows: drawing them
one by one (Bernoulli) moves a concept with 50 annotated rows by a share of about 0.1, and even
rounding each n_s q_s on its own can cross a binding gap. `allocate` chooses integers k_s as close
to n_s q_s as possible (least total absolute change) subject to the problem's own constraints
written in counts, C^T k <= W b, as an integer program solved by HiGHS. Signatures that no
constraint sees (rows without an annotated attribute) are rounded directly: they are the bulk of a
web data set and carry no share.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import warnings

import numpy as np
import scipy.optimize
import scipy.sparse as sp

from solvers.problem import BalanceProblem

# HiGHS stops here and keeps its best integer point: every point it returns meets the constraints
# exactly, and the best ones come early (proving them best takes longer), so a short limit costs a
# few rows of keep rate at most.
DEFAULT_TIME_LIMIT_SECONDS = 10.0
# First search k_s within this many rows of n_s q_s (then wider, then unbounded): the rounding
# only has to undo a few rows per signature, and a narrow box keeps the search flat in N (COCO
# captions x1, x40, x400: about 3 s each, against 2 s, 44 s and over 60 s unboxed).
SEARCH_BANDS = (3, 20, None)
# Stop within 5% of the least total change HiGHS can prove: about 25 rows of the 178k kept of 200k
# COCO caption rows, against 4-8 s more search for a 1% proof.
MIP_RELATIVE_GAP = 0.05
# ... or once the search is provably within this share of the planned rows of the least change,
# whichever comes first. At a million COCO caption rows (888,918 planned) the proof to 5% took
# 3.5 s to bring the total change from 535 rows to 457; stopping here takes 0.8 s and keeps
# 888,620 rows instead of 888,827. Small releases stop at the relative gap, as before; a large one
# never gives up more than this share of its rows beyond what rounding has to cost.
MIP_ABSOLUTE_GAP_OF_PLAN = 1e-4
# HiGHS accepts a row this far past its bound (its default primal feasibility tolerance is 1e-7):
# the integer point is checked again below in exact integer arithmetic of the rounded counts.
_FEASIBILITY_CHECK = 1e-6


@dataclasses.dataclass
class Allocation:
    """Rows to keep per signature (`counts`, integers), and how the integer program went."""

    counts: np.ndarray  # (S,) int64, 0 <= k_s <= n_s
    status: str  # "optimal", "time_limit" (best found), "rounded" (no constraint to meet)
    expected: float  # sum n_s q_s, what the plan keeps on average
    max_violation: float  # largest C^T k - W b over constraint rows, in counts (<= 0 when met)
    statistics: dict


def allocate(problem: BalanceProblem, q: np.ndarray,
             time_limit: float = DEFAULT_TIME_LIMIT_SECONDS) -> Allocation:
    """Integer keep counts k_s for the problem's rows (signatures, weights = n_s) from the plan q.
    """
    counts = np.asarray(problem.weights, dtype=np.float64)
    if not np.allclose(counts, np.round(counts)):
        raise ValueError(
            "exact counts need whole row counts as weights (one weighted row per signature)")
    counts = np.round(counts).astype(np.int64)
    target = counts * np.asarray(q, dtype=np.float64)
    matrix, bounds = problem.constraint_matrix()
    matrix = sp.csr_matrix(matrix)
    constrained = np.flatnonzero(np.diff(matrix.indptr) > 0)
    result = np.clip(np.round(target), 0, counts).astype(np.int64)
    statistics = {"signatures": int(len(counts)), "constrained_signatures": int(len(constrained))}
    if len(constrained) == 0:
        return Allocation(result, "rounded", float(target.sum()),
                          _violation(matrix, bounds, result, problem), statistics)
    block = matrix[constrained].T.tocsr()  # (J, S_c): C^T restricted to constrained signatures
    size = len(constrained)
    # Variables [k (integers), d (>= |k - n q|)]: minimise sum d.
    objective = np.concatenate([np.zeros(size), np.ones(size)])
    identity = sp.identity(size, format="csr")
    rows = sp.vstack([
        sp.hstack([block, sp.csr_matrix((block.shape[0], size))]),  # C^T k <= W b
        sp.hstack([identity, -identity]),                            # k - d <= n q
        sp.hstack([-identity, -identity]),                           # -k - d <= -n q
    ], format="csr")
    upper = np.concatenate(
        [problem.total_weight * bounds, target[constrained], -target[constrained]])
    constraints = scipy.optimize.LinearConstraint(rows, -np.inf, upper)
    integrality = np.concatenate([np.ones(size), np.zeros(size)])
    for band in SEARCH_BANDS:
        low, high = np.zeros(size), counts[constrained].astype(np.float64)
        if band is not None:
            low = np.maximum(np.floor(target[constrained]) - band, 0)
            high = np.minimum(np.ceil(target[constrained]) + band, high)
        variable_bounds = scipy.optimize.Bounds(np.concatenate([low, np.zeros(size)]),
                                                np.concatenate([high, np.full(size, np.inf)]))
        with _quiet_stdout(), warnings.catch_warnings():  # some HiGHS builds print on their own
            # scipy hands options it does not list (mip_abs_gap) to HiGHS verbatim, and says so
            warnings.filterwarnings("ignore", message="Unrecognized options detected")
            answer = scipy.optimize.milp(
                objective, integrality=integrality, bounds=variable_bounds,
                constraints=constraints,
                options={"time_limit": float(time_limit), "disp": False,
                         "mip_rel_gap": MIP_RELATIVE_GAP,
                         "mip_abs_gap": MIP_ABSOLUTE_GAP_OF_PLAN * float(target.sum())})
        if answer.x is not None:
            break
    statistics.update(milp_status=int(answer.status), milp_message=str(answer.message),
                      search_band=band,
                      total_change=None if answer.x is None else float(answer.fun))
    if answer.x is None:
        raise RuntimeError(f"the exact-count integer program found no solution: {answer.message}")
    result[constrained] = np.clip(np.round(answer.x[:size]), 0, counts[constrained]).astype(
        np.int64
    )
    violation = _violation(matrix, bounds, result, problem)
    status = "optimal" if answer.status == 0 else "time_limit"
    if violation > _FEASIBILITY_CHECK:
        raise RuntimeError(
            f"the exact-count integer program returned counts that break a constraint by "
            f"{violation:.3g} rows ({answer.message})"
        )
    return Allocation(result, status, float(target.sum()), violation, statistics)


@contextlib.contextmanager
def _quiet_stdout():
    """Silence file descriptor 1 (where HiGHS's C++ writes) for the duration of the block."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _violation(matrix, bounds, kept: np.ndarray, problem: BalanceProblem) -> float:
    """Largest C^T k - W b (in rows); at most 0 when every constraint holds for the kept counts."""
    if matrix.shape[1] == 0:
        return 0.0
    return float((matrix.T @ kept.astype(np.float64) - problem.total_weight * bounds).max())
