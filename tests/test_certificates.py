"""Certificates in the user's units: "optimal" means every constrained share is within its gap to
1e-6, whatever the total weight. Shares are computed here by hand from q."""
import numpy as np
import pytest

from solvers import solve
from solvers.problem import SHARE_TOLERANCE, BalanceProblem

GAP = 0.05


def web_scale_problem():
    """Rows standing for 1e9 examples: a concept with 50 annotated rows, 80% men; a billion rows
    that show nobody. In moments (1/W units) the concept weighs 5e-8, under any absolute tolerance.
    """
    attributes = np.array([[1, 0], [0, 1], [1, 0], [0, 1], [0, 0]], dtype=float)
    concepts = np.array([[1], [1], [0], [0], [0]], dtype=float)
    weights = np.array([40, 10, 3000, 3000, 1e9 - 6050])
    return BalanceProblem(attributes, concepts, weights=weights, keep_rate=0.9, association_gap=GAP,
                          representation_gap=GAP, min_support=50, attribute_names=["man", "woman"],
                          concept_names=["surfboard"])


def men_share_of_the_concept(problem, q):
    kept = problem.weights * q
    return kept[0] / (kept[0] + kept[1])


@pytest.mark.parametrize("method", ["dual", "exact"])
def test_a_50_row_concept_among_a_billion_rows_is_balanced_to_its_gap(method):
    problem = web_scale_problem()
    assert problem.total_weight == pytest.approx(1e9)
    solution = solve(problem, method=method)
    assert solution.status == "optimal"
    share = men_share_of_the_concept(problem, solution.q)
    assert abs(share - 0.5) <= GAP + SHARE_TOLERANCE
    assert share > 0.5 - GAP - 0.01  # the plan moves it to the gap, not past it
    assert solution.statistics["certified_violation"] <= SHARE_TOLERANCE


def test_the_problem_says_how_far_each_share_is_outside_its_gap():
    problem = web_scale_problem()
    uniform = np.full(problem.num_rows, 0.9)
    excess = problem.share_excess(uniform)
    surfboard = [u for u in range(problem.spec.num_units) if problem.spec.unit_concepts[u] == 0]
    assert excess[surfboard] == pytest.approx([0.8 - 0.5 - GAP, 0.8 - 0.5 - GAP])
    assert problem.certified_violation(uniform) == pytest.approx(0.25)
    # a concept the plan keeps nothing of has no share to certify
    dropped = uniform.copy()
    dropped[:2] = 1e-12
    assert problem.dropped_units(dropped)[surfboard].all()
    assert problem.share_excess(dropped)[surfboard].max() == 0
