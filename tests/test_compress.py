"""Signature compression is exact: solving on signatures gives the same q for every row.

Also: a solution applied to its own rows reproduces q, and survives solution.json.
"""
from __future__ import annotations

import numpy as np
import pytest

from solvers import BalanceSolution, compress, solve
from solvers.compress import compress_problem
from solvers.problem import BalanceProblem

ROW_AGREEMENT = 1e-5  # two Clarabel solves at reference tolerances, on different row layouts
# q from Clarabel's duals vs its primal q (moment-form duals are the least accurate)
KKT_AGREEMENT = 5e-5


def signature_table(rows=4000, seed=0):
    """Few distinct signatures repeated many times, as web captions are."""
    rng = np.random.default_rng(seed)
    attributes = np.zeros((rows, 2))
    annotated = rng.random(rows) < 0.35
    attributes[annotated, rng.integers(0, 2, rows)[annotated]] = 1
    attributes[annotated & (rng.random(rows) < 0.05)] = 1
    concepts = (rng.random((rows, 6)) < 0.08 + 0.2 * attributes[:, :1]).astype(float)
    return attributes, concepts, rng


def test_compress_finds_unique_signatures_and_expands_back():
    attributes, concepts, rng = signature_table()
    weights = rng.integers(1, 4, len(attributes)).astype(float)
    rows = compress(attributes, concepts, weights=weights)
    assert rows.num_rows == len(attributes)
    assert rows.num_signatures == len(np.unique(np.hstack([attributes, concepts]), axis=0))
    assert np.array_equal(rows.attributes[rows.inverse], attributes)
    assert np.array_equal(rows.concepts[rows.inverse], concepts)
    assert rows.counts.sum() == weights.sum()
    assert np.array_equal(rows.expand(np.arange(rows.num_signatures)), rows.inverse)
    with pytest.raises(ValueError, match="per-signature"):
        rows.expand(np.zeros(rows.num_signatures + 1))


def test_utility_is_part_of_the_signature():
    attributes, concepts, _ = signature_table(rows=50)
    attributes, concepts = np.repeat(attributes[:1], 4, axis=0), np.repeat(concepts[:1], 4, axis=0)
    utility = np.array([0.101, 0.102, 0.2, -0.0])
    assert compress(attributes, concepts).num_signatures == 1
    assert compress(attributes, concepts, utility).num_signatures == 4
    rounded = compress(attributes, concepts, np.round(utility, 1))  # -0.0 and 0.0 are one utility
    assert rounded.num_signatures == 3 and sorted(rounded.utility.tolist()) == [0.0, 0.1, 0.2]
    with_first_concept = np.hstack([concepts, np.eye(4)[:, :1]])
    assert compress(attributes, with_first_concept, np.zeros(4)).num_signatures == 2


@pytest.mark.parametrize("form", ["share", "moment"])
def test_compressed_and_full_solves_agree_row_by_row(form):
    attributes, concepts, rng = signature_table()
    weights = rng.integers(1, 4, len(attributes)).astype(float)
    utility = np.round(rng.random(len(attributes)), 1)  # 11 utility levels: still compresses
    problem = BalanceProblem(attributes, concepts, weights=weights, utility=utility,
                             utility_tilt=0.1, constraint_form=form, min_support=30, keep_rate=0.7)
    compressed, inverse = compress_problem(problem)
    assert compressed.num_rows < problem.num_rows / 5
    assert compressed.spec == problem.spec and compressed.total_weight == problem.total_weight
    full = solve(problem, method="exact", compress=False)
    merged = solve(problem, method="exact", compress=True)
    assert merged.statistics["signatures"] == compressed.num_rows
    assert merged.statistics["rows"] == problem.num_rows
    assert merged.q.shape == full.q.shape
    assert np.abs(merged.q - full.q).max() <= ROW_AGREEMENT
    assert merged.objective == pytest.approx(full.objective, rel=1e-7)
    assert (full.constraint_duals > 1e-3).any(), "the comparison should involve binding constraints"
    # The solution applied to the training rows reproduces q.
    assert np.abs(merged.q_for(attributes, concepts, utility) - merged.q).max() <= KKT_AGREEMENT


def test_solution_json_round_trip_keeps_q_for():
    attributes, concepts, rng = signature_table(seed=1)
    utility = rng.random(len(attributes))
    problem = BalanceProblem(attributes, concepts, utility=utility, utility_tilt=0.05,
                             min_support=30, keep_rate=0.7, attribute_names=["man", "woman"],
                             group_names=["perceived_gender"])
    solution = solve(problem, method="exact")
    restored = BalanceSolution.from_json(solution.to_json())
    assert restored.spec == solution.spec
    assert np.array_equal(restored.constraint_duals, solution.constraint_duals)
    assert (restored.keep_rate, restored.rate_dual, restored.status, restored.objective) == (
        solution.keep_rate, solution.rate_dual, solution.status, solution.objective)
    assert restored.q is None  # the JSON carries the rule, not the rows
    assert np.array_equal(restored.q_for(attributes, concepts, utility),
                          solution.q_for(attributes, concepts, utility))
    with pytest.raises(ValueError, match="utility"):
        restored.q_for(attributes, concepts)
