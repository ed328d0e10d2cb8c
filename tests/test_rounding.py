"""Exact counts: whole rows per signature that meet the gaps, as close to M4's plan as integers
allow.

Shares are recomputed here from the counts with plain numpy, not with the solver's matrices.
"""
import collections
import json

import numpy as np
import pytest

from pipeline import plan
from pipeline.annotators.text import annotate_caption
from pipeline.signatures import SignatureTable, row_signature
from solvers.rounding import allocate


def _shares_within(table, counts, gap, targets, min_support):
    """Largest |share - target| over the (value, concept) pairs with at least min_support annotated
    rows in the original table, measured on `counts` kept rows per signature (and over values
    alone)."""
    annotated = table.attributes.max(axis=1) > 0
    worst = 0.0
    columns = [np.ones(len(counts))] + [
        table.concepts[:, r] for r in range(table.concepts.shape[1])
    ]
    for column in columns:
        support_before = (table.weights * annotated * column).sum()
        if column is not columns[0] and support_before < min_support:
            continue
        kept = (counts * annotated * column).sum()
        if kept == 0:
            continue
        for k, target in enumerate(targets):
            share = (counts * table.attributes[:, k] * column).sum() / kept
            worst = max(worst, abs(share - target) - gap)
    return worst


def _coco_table(shared_data, copies=1):
    """COCO val captions' signature counts, each caption counted `copies` times (x40: the scale
    harness's million-row table)."""
    document = json.loads((shared_data / "coco_val2017_captions.json").read_text())
    captions = [a["caption"] for a in document["annotations"]]
    counts = collections.Counter()
    for caption in captions:
        attributes, concepts, _ = annotate_caption(caption)
        counts[row_signature(attributes, concepts)] += copies
    return SignatureTable.from_counts(counts.items())


@pytest.mark.parametrize("gap,copies", [(0.05, 1), (0.02, 1), (0.05, 40)])
def test_exact_counts_meet_the_gap_on_coco_captions_where_rounding_alone_does_not(
        shared_data, gap, copies):
    table = _coco_table(shared_data, copies)
    config = plan.BalanceConfig(keep_rate="max", association_gap=gap, representation_gap=gap)
    solution, projected = plan.solve_table(table, config)
    problem, *_ = plan.build_problem(table, config)
    assert np.allclose(problem.weights, projected.weights)
    allocation = allocate(problem, solution.q)
    counts = allocation.counts
    assert counts.dtype.kind == "i" and (counts >= 0).all() and (counts <= projected.weights).all()
    targets = np.asarray(solution.spec.targets)
    assert _shares_within(projected, counts, gap, targets, config.min_support) <= 1e-9
    planned = projected.weights * solution.q
    assert np.abs(counts - planned).max() <= 3  # whole rows near the plan, signature by signature
    assert counts.sum() >= 0.995 * planned.sum()
    if copies > 1:  # a million rows: the rounding moves no more than a thousandth of the plan
        assert np.abs(counts - planned).sum() <= 1e-3 * planned.sum()
    # Rounding each signature on its own is not enough: it crosses the gap somewhere.
    rounded = np.round(planned)
    assert _shares_within(projected, rounded, gap, targets, config.min_support) > 1e-9


def test_nothing_to_round_when_no_signature_is_constrained():
    table = SignatureTable.from_records(
        [
            {"attributes": ["g:a"], "concepts": [], "utility": None, "count": 10},
            {"attributes": ["g:b"], "concepts": [], "utility": None, "count": 10},
            {"attributes": [], "concepts": [], "utility": None, "count": 33},
        ]
    )
    problem, *_ = plan.build_problem(
        table, plan.BalanceConfig(keep_rate=0.5, representation_gap=1.0, min_support=1)
    )
    q = np.full(len(table.weights), 0.5)
    allocation = allocate(problem, q)
    assert (
        allocation.counts.tolist()
        == np.clip(np.round(table.weights * q), 0, table.weights).astype(int).tolist()
    )


def test_weights_must_be_row_counts():
    table = SignatureTable.from_records(
        [
            {"attributes": ["g:a"], "concepts": [], "utility": None, "count": 10},
            {"attributes": ["g:b"], "concepts": [], "utility": None, "count": 10},
        ]
    )
    problem, *_ = plan.build_problem(table, plan.BalanceConfig(keep_rate=0.5, min_support=1))
    problem.weights = problem.weights + 0.5
    with pytest.raises(ValueError, match="whole row counts"):
        allocate(problem, np.full(2, 0.5))
