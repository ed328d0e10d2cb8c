"""The dual M4 solver against the exact (cvxpy + Clarabel) optimum on many problems.

Random and structured problems: overlapping values, unannotated rows, two groups, utility, weights.
"""
from __future__ import annotations

import os

import cvxpy as cp
import numpy as np
import pytest
import threadpoolctl

from solvers import solve
from solvers.dual import solve_dual, solve_rate_multiplier
from solvers.errors import InfeasibleError
from solvers.exact import solve_exact
from solvers.problem import BalanceProblem
from solvers.solution import BalanceSolution

# Acceptance numbers of issue 2: dual and exact agree to 1e-4 in objective, violations <= 1e-6.
OBJECTIVE_AGREEMENT = 1e-4
VIOLATION_LIMIT = 1e-6
STRUCTURES = ("overlap", "unannotated", "two_groups", "utility", "weights",
              "preserve_unconditional")


def random_rows(rng, rows, *, annotated=0.3, overlap=0.05, concepts=12, association=0.25, values=2):
    """0/1 attributes (one group of `values` columns) and concepts with a planted association."""
    is_annotated = rng.random(rows) < annotated
    value = rng.integers(0, values, rows)
    attributes = np.zeros((rows, values))
    attributes[is_annotated, value[is_annotated]] = 1
    attributes[is_annotated & (rng.random(rows) < overlap)] = 1
    prevalence = 0.05 + 0.25 * rng.random(concepts)
    tilt = association * (rng.random(concepts) - 0.5)
    probability = np.clip(prevalence + tilt * (attributes[:, [0]] - attributes[:, [1]]), 0, 1)
    return attributes, (rng.random((rows, concepts)) < probability).astype(float)


def random_problem(structure: str, form: str, seed: int, rows: int = 2500) -> BalanceProblem:
    rng = np.random.default_rng(seed)
    options = dict(constraint_form=form, min_support=20)
    if form == "moment":
        options.update(representation_gap=0.01, association_gap=0.002)
    if structure == "overlap":
        attributes, concepts = random_rows(rng, rows, overlap=0.15)
    elif structure == "unannotated":
        attributes, concepts = random_rows(rng, rows, annotated=0.08, overlap=0.0)
        options["min_support"] = 10
    elif structure == "two_groups":
        gender, concepts = random_rows(rng, rows)
        age, _ = random_rows(rng, rows, annotated=0.5, overlap=0.02)
        attributes = np.hstack([gender, age])
        options["groups"] = [[0, 1], [2, 3]]
    elif structure == "utility":
        attributes, concepts = random_rows(rng, rows)
        options.update(utility=rng.normal(0, 1, rows), utility_tilt=0.05)
    elif structure == "weights":
        attributes, concepts = random_rows(rng, rows)
        options["weights"] = rng.integers(1, 6, rows).astype(float)
    elif structure == "preserve_unconditional":
        attributes, concepts = random_rows(rng, rows, overlap=0.0)
        options.update(targets="preserve", conditional=False)
    else:
        raise ValueError(structure)
    return BalanceProblem(attributes, concepts, **options)


def max_rate(problem: BalanceProblem) -> float:
    """Largest feasible keep rate by the LP of DESIGN.md (HiGHS), as a reference in tests."""
    matrix, bounds = problem.constraint_matrix()
    shares = problem.weights / problem.total_weight
    q = cp.Variable(problem.num_rows)
    program = cp.Problem(cp.Maximize(shares @ q),
                         [q >= 0, q <= 1, matrix.T @ cp.multiply(shares, q) <= bounds])
    program.solve(solver="HIGHS")
    return float(program.value)


def assert_agrees_with_exact(problem: BalanceProblem, keep_rate: float) -> BalanceSolution:
    exact = solve_exact(problem, keep_rate)
    dual = solve_dual(problem, keep_rate)
    assert dual.status == "optimal"
    assert abs(dual.objective - exact.objective) <= OBJECTIVE_AGREEMENT * max(exact.objective, 1e-9)
    assert dual.max_violation <= VIOLATION_LIMIT
    assert float(problem.violations(dual.q).max()) <= VIOLATION_LIMIT
    assert dual.q.min() >= 0 and dual.q.max() <= 1
    assert abs(problem.weights @ dual.q / problem.total_weight - keep_rate) <= 1e-9
    # Strict convexity: the optimum is unique, so q agrees row by row up to Clarabel's accuracy.
    assert np.abs(dual.q - exact.q).max() <= 5e-3
    return dual


@pytest.mark.parametrize("form", ["share", "moment"])
@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("seed", [0, 1])
def test_dual_matches_exact(structure, form, seed):
    problem = random_problem(structure, form, seed)
    highest = max_rate(problem)
    assert highest < 0.999, "the planted association should make some constraints bind"
    for fraction in (0.85, 0.995):  # comfortable, and near the largest feasible rate
        solution = assert_agrees_with_exact(problem, fraction * highest)
        assert solution.statistics["relative_duality_gap"] <= solution.statistics["tolerance"]
        assert np.any(solution.constraint_duals > 0), (
            "binding constraints have positive multipliers"
        )


def test_constraints_already_met_at_uniform_rate_give_zero_duals():
    rng = np.random.default_rng(3)
    attributes, concepts = random_rows(rng, 2000, association=0.0, overlap=0.0)
    problem = BalanceProblem(
        attributes, concepts, representation_gap=0.5, association_gap=0.5, min_support=10
    )
    solution = solve_dual(problem, 0.7)
    assert solution.status == "optimal"
    np.testing.assert_array_equal(solution.constraint_duals, 0.0)
    np.testing.assert_allclose(solution.q, 0.7, atol=1e-12)
    assert solution.objective <= 1e-20


def test_rows_with_weights_equal_repeated_rows():
    rng = np.random.default_rng(4)
    attributes, concepts = random_rows(rng, 800)
    counts = rng.integers(1, 4, 800)
    weighted = BalanceProblem(attributes, concepts, weights=counts.astype(float), min_support=10)
    repeated = BalanceProblem(
        np.repeat(attributes, counts, axis=0), np.repeat(concepts, counts, axis=0), min_support=10
    )
    rate = 0.95 * max_rate(weighted)
    q_weighted = solve_dual(weighted, rate).q
    q_repeated = solve_dual(repeated, rate).q
    np.testing.assert_allclose(np.repeat(q_weighted, counts), q_repeated, atol=1e-6)


def test_duals_reproduce_q_on_training_rows_and_survive_json():
    problem = random_problem("utility", "share", 5)
    solution = solve_dual(problem, 0.9 * max_rate(problem))
    np.testing.assert_allclose(
        solution.q_for(problem.attributes, problem.concepts, problem.utility),
        solution.q,
        atol=1e-12,
    )
    restored = BalanceSolution.from_json(solution.to_json())
    np.testing.assert_allclose(
        restored.q_for(problem.attributes, problem.concepts, problem.utility),
        solution.q,
        atol=1e-12,
    )
    assert (
        restored.method == "dual"
        and restored.statistics["iterations"] == solution.statistics["iterations"]
    )


def test_statistics_record_iterations_time_and_certificates():
    problem = random_problem("overlap", "share", 6)
    solution = solve_dual(problem, 0.9 * max_rate(problem), progress=True)
    statistics = solution.statistics
    assert statistics["iterations"] >= 1 and statistics["seconds"] > 0
    assert statistics["max_violation"] <= statistics["tolerance"]
    # unannotated rows merged for the rate search
    assert statistics["constrained_rows"] < problem.num_rows


def test_rate_multiplier_is_exact_on_ties_and_weights():
    rng = np.random.default_rng(7)
    shift = np.round(rng.normal(0.8, 0.4, 5000), 2)  # many equal breakpoints
    weights = rng.integers(1, 10, 5000).astype(float)
    for target in (0.05, 0.5, 0.93):
        nu, keep = solve_rate_multiplier(shift, weights, target * weights.sum(), start=3.0)
        np.testing.assert_allclose(keep, np.clip(shift - nu, 0, 1))
        assert abs(weights @ keep / weights.sum() - target) <= 1e-12


def test_keep_rate_above_the_achievable_one_is_refused():
    problem = random_problem("overlap", "share", 8)
    highest = max_rate(problem)
    with pytest.raises(InfeasibleError, match="infeasible: at most") as refused:
        solve_dual(problem, min(1.0, highest + 0.05))
    assert refused.value.achievable_rate == pytest.approx(highest, abs=1e-6)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two cores for two BLAS threads")
def test_q_is_the_same_whatever_the_number_of_blas_threads():
    # 40 concepts, three values: Newton steps on a working set large enough that OpenBLAS splits
    # its solve across threads (with 12 concepts it does not, and q agreed before the fix too)
    rng = np.random.default_rng(0)
    attributes, concepts = random_rows(rng, 20000, concepts=40, values=3, overlap=0.15)
    problem = BalanceProblem(attributes, concepts, min_support=20, association_gap=0.05,
                             keep_rate="max")
    solutions = []
    for threads in (1, 2):
        with threadpoolctl.threadpool_limits(threads, user_api="blas"):
            solutions.append(solve(problem, "dual"))
    assert solutions[0].status == "optimal"
    assert solutions[0].q.tobytes() == solutions[1].q.tobytes()
    assert np.asarray(solutions[0].constraint_duals).tobytes() == np.asarray(
        solutions[1].constraint_duals).tobytes()
