"""BalanceProblem: bad input gets a clear error, and the canonical rows C mean the shares they say.

Each constraint row is checked against shares computed directly from the table.
"""
from __future__ import annotations

import numpy as np
import pytest

from solvers.bias import data_bias
from solvers.problem import BalanceProblem
from solvers.spec import REPRESENTATION


def small_table(rows=400, seed=0):
    rng = np.random.default_rng(seed)
    attributes = np.zeros((rows, 2))
    annotated = rng.random(rows) < 0.6
    attributes[annotated, rng.integers(0, 2, rows)[annotated]] = 1
    attributes[annotated & (rng.random(rows) < 0.1)] = 1  # both values on some rows
    concepts = (rng.random((rows, 4)) < 0.2 + 0.2 * attributes[:, :1]).astype(float)
    return attributes, concepts


@pytest.mark.parametrize("change, message", [
    (lambda a, y: (np.where(np.arange(a.size).reshape(a.shape) == 3, np.nan, a), y), "NaN"),
    (lambda a, y: (a, np.where(np.arange(y.size).reshape(y.shape) == 5, np.nan, y)), "NaN"),
    (lambda a, y: (a[:, 0], y), "2-D"),
    (lambda a, y: (a, y[:-1]), "rows"),
    (lambda a, y: (a * 2, y), "only 0 and 1"),
    (lambda a, y: (a, y - 0.5), "only 0 and 1"),
    (lambda a, y: (np.zeros_like(a), y), "no row has any value"),
    (lambda a, y: (a, np.hstack([y, np.ones((len(y), 1))])), "present in every row"),
])
def test_bad_tables_are_rejected_with_the_reason(change, message):
    attributes, concepts = change(*small_table())
    with pytest.raises(ValueError, match=message):
        BalanceProblem(attributes, concepts)


@pytest.mark.parametrize("options, message", [
    (dict(groups=[[0], [0, 1]]), "partition"),
    (dict(groups=[[0]]), "partition"),
    (dict(targets=[0.3, 0.3]), "contradictory"),
    (dict(targets=[0.5, 1.5]), r"\[0, 1\]"),
    (dict(targets=[0.5]), "finite numbers"),
    (dict(targets="equal"), "uniform"),
    (dict(keep_rate=1.5), "keep_rate"),
    (dict(keep_rate="all"), "keep_rate"),
    (dict(weights=np.zeros(400)), "positive"),
    (dict(weights=np.ones(3)), "shape"),
    (dict(utility=np.full(400, np.nan), utility_tilt=0.1), "NaN"),
    (dict(constraint_form="ratio"), "constraint_form"),
    (dict(representation_gap=-0.1), ">= 0"),
])
def test_bad_configuration_is_rejected_with_the_reason(options, message):
    with pytest.raises(ValueError, match=message):
        BalanceProblem(*small_table(), **options)


def test_share_rows_state_the_share_gap_of_each_unit():
    """(1/W) C^T (w q) on the upper row is (share - target - gap) x (kept annotated support) / W."""
    attributes, concepts = small_table()
    rng = np.random.default_rng(1)
    weights = rng.integers(1, 4, len(attributes)).astype(float)
    problem = BalanceProblem(attributes, concepts, weights=weights, targets=[0.45, 0.6],
                             association_gap=0.03, representation_gap=0.01, min_support=10)
    q = rng.random(len(attributes))
    matrix, bounds = problem.constraint_matrix()
    rows = matrix.T @ (weights * q) / problem.total_weight
    spec = problem.spec
    units = spec.num_units
    assert units == 2 + 2 * 4 and np.all(bounds == 0)
    kept = weights * q
    annotated = attributes.max(axis=1)
    for u in range(units):
        k, r = spec.unit_values[u], spec.unit_concepts[u]
        y = np.ones(len(q)) if r == REPRESENTATION else concepts[:, r]
        support = kept @ (annotated * y)
        share = kept @ (attributes[:, k] * y) / support
        gap = 0.01 if r == REPRESENTATION else 0.03
        assert rows[u] == pytest.approx(
            (share - spec.targets[k] - gap) * support / problem.total_weight)
        assert rows[units + u] == pytest.approx(
            (spec.targets[k] - share - gap) * support / problem.total_weight)
    # The violations are zero exactly where the share is within its gap.
    assert (problem.violations(q) > 0).any()


def test_moment_rows_are_the_moments_of_data_bias():
    attributes, concepts = small_table()
    problem = BalanceProblem(attributes, concepts, constraint_form="moment", min_support=10,
                             representation_gap=0.01, association_gap=0.002)
    q = np.random.default_rng(2).random(len(attributes))
    matrix, bounds = problem.constraint_matrix()
    rows = matrix.T @ q / problem.total_weight
    bias = data_bias(attributes, concepts, q=q)
    units = problem.spec.num_units
    for u in range(units):
        k, r = problem.spec.unit_values[u], problem.spec.unit_concepts[u]
        moment = (
            bias.representation_moment[k] if r == REPRESENTATION else bias.association_moment[k, r]
        )
        assert rows[u] == pytest.approx(moment) and rows[units + u] == pytest.approx(-moment)
        assert bounds[u] == bounds[units + u] == (0.01 if r == REPRESENTATION else 0.002)


def test_concepts_below_min_support_are_left_out_and_named():
    attributes, concepts = small_table()
    rare = np.zeros((len(attributes), 1))
    rare[np.flatnonzero(attributes.max(axis=1))[:5]] = 1  # 5 annotated rows
    problem = BalanceProblem(
        attributes,
        np.hstack([concepts, rare]),
        min_support=6,
        concept_names=["a", "b", "c", "d", "rare"],
        group_names=["perceived_gender"],
    )
    assert problem.excluded_concepts == {"perceived_gender": ["rare"]}
    assert 4 not in problem.spec.unit_concepts
    kept = BalanceProblem(attributes, np.hstack([concepts, rare]), min_support=5)
    assert 4 in kept.spec.unit_concepts


def test_unconditional_shares_count_every_row():
    attributes, concepts = small_table()
    problem = BalanceProblem(
        attributes, concepts, conditional=False, targets=[0.3, 0.3], min_support=10
    )
    base, scale = problem.unit_matrices()
    # a = 1 for every row: the representation unit's support is all rows.
    assert scale[:, 0].sum() == len(attributes)
