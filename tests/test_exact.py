"""The exact solver: optimal, feasible, and its recovered duals reproduce q (KKT) on new rows.

Every installed solver cvxpy offers for the QP reaches the same optimum.
"""
from __future__ import annotations

import numpy as np
import pytest

from solvers.exact import dual_objective, solve_exact
from solvers.problem import BalanceProblem

KKT_TOLERANCE = 1e-5  # q from (lambda, nu) vs Clarabel's primal q, at its reference tolerances


def planted_problem(rows=1500, seed=0, **options):
    """Annotated rows with a planted man-concept association, so constraints bind at rate 0.6."""
    rng = np.random.default_rng(seed)
    attributes = np.zeros((rows, 2))
    annotated = rng.random(rows) < 0.4
    attributes[annotated, 0] = rng.random(annotated.sum()) < 0.65
    attributes[annotated, 1] = (rng.random(annotated.sum()) < 0.45) | (
        attributes[annotated, 0] == 0
    )
    concepts = (rng.random((rows, 8)) < 0.1 + 0.3 * attributes[:, :1]).astype(float)
    options.setdefault("min_support", 20)
    options.setdefault("keep_rate", 0.6)
    return BalanceProblem(attributes, concepts, **options), rng


@pytest.mark.parametrize("form", ["share", "moment"])
def test_duals_reproduce_q_and_constraints_hold(form):
    problem, rng = planted_problem(constraint_form=form)
    weighted, _ = planted_problem(
        constraint_form=form,
        weights=rng.integers(1, 5, 1500).astype(float),
        utility=rng.random(1500),
        utility_tilt=0.2,
    )
    for current in (problem, weighted):
        solution = solve_exact(current)
        assert solution.status == "optimal" and solution.method == "exact"
        assert solution.q.min() >= 0 and solution.q.max() <= 1
        assert current.weights @ solution.q / current.total_weight == pytest.approx(0.6, abs=1e-8)
        assert solution.max_violation <= 1e-7
        # 1/2 sum w (q - t)^2 with t = eta + tau (u - mean_w u), written out here, not the problem's
        # formula
        targets = np.full(current.num_rows, 0.6)
        if current.utility is not None:
            targets += 0.2 * (
                current.utility - np.average(current.utility, weights=current.weights)
            )
        assert solution.objective == pytest.approx(
            0.5 * np.sum(current.weights * (solution.q - targets) ** 2)
        )
        assert abs(solution.duality_gap) <= 1e-7
        # Stationarity: q = clip(t - C lambda - nu, 0, 1) from the duals alone.
        lam = solution.constraint_duals
        assert (lam >= 0).all() and (lam > 1e-3).any(), "planted associations make constraints bind"
        utility = current.utility
        assert (
            np.abs(solution.q_for(current.attributes, current.concepts, utility) - solution.q).max()
            <= KKT_TOLERANCE
        )
        # Complementary slackness: a positive multiplier only on a constraint that is tight.
        matrix, bounds = current.constraint_matrix()
        slack = bounds - matrix.T @ (current.weights * solution.q) / current.total_weight
        assert np.all(slack[lam > 1e-4] <= 1e-7)


def test_no_binding_constraint_means_uniform_subsampling():
    problem, _ = planted_problem(representation_gap=1.0, association_gap=1.0)
    solution = solve_exact(problem, keep_rate=0.7)
    assert np.allclose(solution.q, 0.7, atol=1e-7)
    assert np.abs(solution.constraint_duals).max() <= 1e-7


def test_dual_objective_is_a_lower_bound_and_tight_at_the_duals():
    problem, rng = planted_problem()
    solution = solve_exact(problem)
    for _ in range(5):
        random_duals = rng.random(len(solution.constraint_duals)) * 0.1
        assert dual_objective(problem, 0.6, random_duals, rng.normal()) <= solution.objective + 1e-9
    assert dual_objective(
        problem, 0.6, solution.constraint_duals, solution.rate_dual
    ) == pytest.approx(solution.objective, rel=1e-7)


@pytest.mark.parametrize("solver", ["OSQP", "SCS", "HIGHS"])
def test_other_installed_solvers_reach_the_same_optimum(solver):
    problem, _ = planted_problem(rows=300, min_support=10)
    reference = solve_exact(problem)
    other = solve_exact(problem, solver=solver.lower())
    assert other.statistics["solver"] == solver
    assert other.objective == pytest.approx(reference.objective, rel=1e-3)
    assert other.max_violation <= 1e-4
    assert np.abs(other.q - reference.q).max() <= 2e-2


def test_unknown_solver_names_the_installed_ones():
    problem, _ = planted_problem(rows=200, min_support=5)
    with pytest.raises(ValueError, match="CLARABEL"):
        solve_exact(problem, solver="GUROBI_NOT_HERE")


def test_solution_travels_to_unseen_rows():
    problem, _ = planted_problem(seed=3)
    solution = solve_exact(problem)
    fresh, _ = planted_problem(rows=500, seed=4)
    q = solution.q_for(fresh.attributes, fresh.concepts)
    # Rows with the same features as training rows get the same q.
    training = {
        tuple(row): value
        for row, value in zip(np.hstack([problem.attributes, problem.concepts]), solution.q)
    }
    matched = [
        (training[tuple(row)], value)
        for row, value in zip(np.hstack([fresh.attributes, fresh.concepts]), q)
        if tuple(row) in training
    ]
    assert len(matched) > 100
    assert np.abs(np.subtract(*np.array(matched).T)).max() <= KKT_TOLERANCE
