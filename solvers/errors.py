"""Errors the solvers raise with an explanation a data engineer can act on.

An infeasible keep rate names the achievable rate and, in shares, the constraints that bind.
"""
from __future__ import annotations

import numpy as np

from solvers.problem import BalanceProblem
from solvers.spec import REPRESENTATION

# How many binding constraints the message spells out (all of them stay in `.binding`).
MESSAGE_BINDING_LIMIT = 5


class InfeasibleError(ValueError):
    """The requested keep rate cannot meet the constraints.

    `achievable_rate` is the largest rate that can; `binding` lists the constraints that stop a
    higher one (dicts with the value, concept, the data's share at q = 1, target and gap).
    """

    def __init__(self, message: str, *, requested_rate: float, achievable_rate: float,
                 binding: list[dict]):
        super().__init__(message)
        self.requested_rate = requested_rate
        self.achievable_rate = achievable_rate
        self.binding = binding


def explain_infeasible(problem: BalanceProblem, keep_rate: float) -> InfeasibleError:
    """Build (not raise) the error for `keep_rate`, from the max-rate LP and the data's own shares.
    """
    from solvers.max_rate import solve_max_rate

    answer = solve_max_rate(problem)
    binding = binding_constraints(problem, answer.binding_rows)
    described = "; ".join(entry["text"] for entry in binding[:MESSAGE_BINDING_LIMIT])
    if len(binding) > MESSAGE_BINDING_LIMIT:
        described += f"; and {len(binding) - MESSAGE_BINDING_LIMIT} more"
    message = (
        f"keep rate {keep_rate:.4g} is infeasible: at most {answer.rate:.4g} of the data can be "
        "kept under the requested constraints (use keep_rate='max' to take it, or widen the gaps).")
    if described:
        message += f" Binding: {described}."
    return InfeasibleError(message, requested_rate=float(keep_rate), achievable_rate=answer.rate,
                           binding=binding)


def binding_constraints(problem: BalanceProblem, rows: list[int]) -> list[dict]:
    """Readable entries for constraint rows: "'woman' is 31% of perceived_gender-annotated 'kitchen'
    rows"."""
    spec = problem.spec
    units = spec.num_units
    base, scale = problem.unit_matrices()  # B = v y, S = a y per unit
    w = problem.weights
    annotated_weight = w @ scale
    targets = np.asarray(spec.targets)[spec.unit_values]
    with np.errstate(divide="ignore", invalid="ignore"):
        data_share = (w @ base) / annotated_weight + targets  # share = sum w s y / sum w a y
    entries = []
    for row in rows:
        unit = row % units
        value = spec.attribute_names[spec.unit_values[unit]]
        concept = spec.unit_concepts[unit]
        group = spec.group_names[spec.value_group()[spec.unit_values[unit]]]
        where = f"{group}-annotated rows" if concept == REPRESENTATION else \
            f"{group}-annotated '{spec.concept_names[concept]}' rows"
        gap = spec.unit_gaps[unit]
        if spec.constraint_form == "share":
            tolerance = f" ± {gap:.0%}"
        else:
            tolerance = f", moment within ± {gap:.2g}"
        share = float(data_share[unit])
        entries.append({
            "row": int(row),
            "side": "upper" if row < units else "lower",
            "value": value,
            "concept": None if concept == REPRESENTATION else spec.concept_names[concept],
            "group": group,
            "data_share": share,
            "target": float(targets[unit]),
            "gap": gap,
            "support": float(annotated_weight[unit]),
            "text": f"'{value}' is {share:.0%} of {where} (target {targets[unit]:.0%}{tolerance})",
        })
    return entries
