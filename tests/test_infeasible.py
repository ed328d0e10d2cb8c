"""A keep rate above the achievable one fails with the achievable rate and the binding shares.

keep_rate="max" takes the largest feasible rate and says so.
"""
from __future__ import annotations

import numpy as np
import pytest

from solvers import InfeasibleError, max_keep_rate, solve
from solvers.api import MAX_RATE_BACKOFF
from solvers.exact import solve_exact
from solvers.problem import BalanceProblem


def men_and_women(men=60, women=40, nobody=100):
    """Rows showing a man, a woman or no person; one concept ('kitchen') on the first 30 men."""
    rows = men + women + nobody
    attributes = np.zeros((rows, 2))
    attributes[:men, 0] = 1
    attributes[men:men + women, 1] = 1
    concepts = np.zeros((rows, 1))
    concepts[:30, 0] = 1
    concepts[men:men + 10, 0] = 1
    return attributes, concepts


def representation_only(**options):
    attributes, concepts = men_and_women()
    # min_support 100 leaves 'kitchen' (40 annotated rows) out: only the representation shares bind.
    return BalanceProblem(attributes, concepts, min_support=100, attribute_names=["man", "woman"],
                          concept_names=["kitchen"], group_names=["perceived_gender"], **options)


def test_max_rate_matches_the_hand_computed_one():
    # Keep every woman and nobody-row; men up to m / (m + 40) = 0.52, m = 0.52 * 40 / 0.48.
    men_kept = 0.52 * 40 / 0.48
    assert max_keep_rate(representation_only()) == pytest.approx((100 + 40 + men_kept) / 200,
                                                                 abs=1e-7)
    assert max_keep_rate(representation_only(representation_gap=0.1)) == pytest.approx(1.0)


def test_rate_above_achievable_names_the_rate_and_the_binding_share():
    problem = representation_only()
    with pytest.raises(InfeasibleError) as raised:
        solve(problem, method="exact", keep_rate=0.95)
    error = raised.value
    assert isinstance(error, ValueError)
    assert error.achievable_rate == pytest.approx(max_keep_rate(problem))
    message = str(error)
    assert "keep rate 0.95 is infeasible" in message
    assert f"at most {error.achievable_rate:.4g}" in message
    assert "'man' is 60% of perceived_gender-annotated rows (target 50% ± 2%)" in message
    assert error.binding[0]["value"] == "man" and error.binding[0]["side"] == "upper"


def test_binding_association_is_named_with_its_concept():
    attributes, concepts = men_and_women()
    problem = BalanceProblem(attributes, concepts, representation_gap=0.5, association_gap=0.05,
                             min_support=20, attribute_names=["man", "woman"],
                             concept_names=["kitchen"], group_names=["perceived_gender"])
    # kitchen: 30 men, 10 women; keep all 10 women and 10 * 0.55 / 0.45 men.
    assert max_keep_rate(problem) == pytest.approx((200 - 30 + 10 * 0.55 / 0.45) / 200, abs=1e-7)
    with pytest.raises(
            InfeasibleError, match=r"'man' is 75% of perceived_gender-annotated 'kitchen' rows "
            r"\(target 50% ± 5%\)"):
        solve(problem, method="exact", keep_rate=0.99)


def test_exact_solver_alone_explains_an_infeasible_status():
    problem = representation_only()
    highest = max_keep_rate(problem)
    solve_exact(problem, keep_rate=highest - 1e-4)
    with pytest.raises(InfeasibleError, match="at most 0.9167"):
        solve_exact(problem, keep_rate=highest + 1e-3)


def test_keep_rate_max_is_used_and_stated():
    problem = representation_only(keep_rate="max")
    solution = solve(problem, method="exact")
    highest = max_keep_rate(problem)
    assert solution.keep_rate == pytest.approx(highest - MAX_RATE_BACKOFF, abs=1e-9)
    assert solution.statistics["keep_rate_requested"] == "max"
    assert solution.statistics["max_keep_rate"] == pytest.approx(highest)
    assert solution.max_violation <= 1e-7
    kept_men = solution.q[:60].sum()
    # the cap binds at the LP's rate; MAX_RATE_BACKOFF below it the share sits just under the cap
    assert 0.52 - 1e-4 <= kept_men / (kept_men + solution.q[60:100].sum()) <= 0.52 + 1e-7
    also = solve(representation_only(), method="exact", keep_rate="max")
    assert also.keep_rate == pytest.approx(solution.keep_rate)


def test_contradictory_targets_are_refused_before_solving():
    attributes, concepts = men_and_women()
    with pytest.raises(ValueError, match="contradictory"):
        BalanceProblem(attributes, concepts, targets=[0.2, 0.5])


@pytest.mark.parametrize("keep_rate", [1.5, 0.0, -0.2, float("nan"), "most", None])
def test_keep_rate_outside_the_unit_interval_is_a_plain_error_everywhere(keep_rate):
    """The problem, solve() with each method and each solver called directly refuse the same rates
    with the same message (the streaming solver once accepted any number)."""
    from solvers.dual import solve_dual
    from solvers.streaming import solve_streaming

    problem = representation_only()
    calls = [lambda: BalanceProblem(problem.attributes, problem.concepts, keep_rate=keep_rate)]
    if keep_rate is not None:  # None means "the problem's own rate" to the solvers
        calls += [lambda m=method: solve(problem, method=m, keep_rate=keep_rate)
                  for method in ("exact", "dual", "streaming")]
        calls += [lambda f=solver: f(problem, keep_rate=keep_rate)
                  for solver in (solve_exact, solve_dual, solve_streaming)]
    for call in calls:
        with pytest.raises(ValueError, match=r"keep_rate must be (a number )?in \(0, 1\]"):
            call()
    assert solve_streaming(problem, keep_rate=0.8).keep_rate == pytest.approx(0.8, abs=1e-3)
