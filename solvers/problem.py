"""The M4 problem: data, targets and constraints, reduced to one canonical linear form.

Every solver (exact, dual, streaming, max rate) reads the same `ConstraintSpec` (solvers/spec.py;
DESIGN.md, "M4").
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import scipy.sparse as sp

from solvers.spec import CONSTRAINT_FORMS, REPRESENTATION, ConstraintSpec, as_indicator, as_vector

# Share-gap defaults: "women are 52% of kitchen captions" is within 2 points of a 50% target.
DEFAULT_SHARE_GAP = 0.02
# Moment-form defaults (the paper's units: mean of w q (s - pi a) y over all rows). On COCO
# captions a concept with 1% support and a 2-point share gap has a moment of 2e-4.
DEFAULT_MOMENT_REPRESENTATION_EPS = 0.01
DEFAULT_MOMENT_ASSOCIATION_EPS = 0.0005
# DESIGN.md: "A concept with too little annotated support (a minimum count, e.g. 50) is left out".
DEFAULT_MIN_SUPPORT = 50
DEFAULT_KEEP_RATE = 0.9
# DESIGN.md, "Certificates": a solution is optimal only when every constrained share is within its
# gap to this much, as a share, whatever the total weight W.
SHARE_TOLERANCE = 1e-6
# A unit that keeps less than this fraction of its annotated weight (and less than a millionth of a
# row) has no share: the plan dropped its concept (q of about 1e-12 on its rows, or a few millionths
# on the way there), and a ratio of two rounding errors says nothing. In a release that is no row.
DROPPED_FRACTION = 1e-4
DROPPED_SUPPORT = 1e-6


def check_keep_rate(keep_rate):
    """A keep rate as given: "max", or a number in (0, 1] as a float; anything else raises
    ValueError.

    The one check: the problem, solve() and every solver call it."""
    if isinstance(keep_rate, str):
        if keep_rate != "max":
            raise ValueError(f"keep_rate must be a number in (0, 1] or 'max', got {keep_rate!r}")
        return keep_rate
    try:
        value = float(keep_rate)
    except (TypeError, ValueError):
        raise ValueError(
            f"keep_rate must be a number in (0, 1] or 'max', got {keep_rate!r}") from None
    if not 0 < value <= 1:  # NaN fails here too
        raise ValueError(f"keep_rate must be in (0, 1], got {keep_rate}")
    return value


def resolve_keep_rate(problem: BalanceProblem, keep_rate=None) -> float:
    """The rate a solver aims for: the call's keep_rate, else the problem's; "max" is the highest
    feasible rate, from the max-rate LP."""
    keep_rate = check_keep_rate(problem.keep_rate if keep_rate is None else keep_rate)
    if keep_rate == "max":
        from solvers.max_rate import max_keep_rate  # noqa: PLC0415 (LP solver only when asked)

        return float(max_keep_rate(problem))
    return keep_rate


class BalanceProblem:
    """An M4 problem: which rows show which attribute values and concepts, and what to reach.

    Configuration is checked here, once; solvers only read `spec`, `weights` and `keep_targets`.
    """

    def __init__(
        self,
        attributes,
        concepts,
        *,
        groups: Sequence[Sequence[int]] | None = None,
        targets="uniform",
        keep_rate=DEFAULT_KEEP_RATE,
        representation_gap: float | None = None,
        association_gap=None,
        constraint_form: str = "share",
        min_support: float = DEFAULT_MIN_SUPPORT,
        weights=None,
        utility=None,
        utility_tilt: float = 0.0,
        conditional: bool = True,
        attribute_names: Sequence[str] | None = None,
        concept_names: Sequence[str] | None = None,
        group_names: Sequence[str] | None = None,
    ):
        # The configuration, so the same problem can be rebuilt on other rows (compression).
        self.options = dict(groups=groups, targets=targets, keep_rate=keep_rate,
                            representation_gap=representation_gap, association_gap=association_gap,
                            constraint_form=constraint_form, min_support=min_support,
                            utility_tilt=utility_tilt, conditional=conditional,
                            attribute_names=attribute_names, concept_names=concept_names,
                            group_names=group_names)
        self.attributes = as_indicator(attributes, "attributes")
        rows, num_values = self.attributes.shape
        self.concepts = as_indicator(concepts, "concepts", rows)
        num_concepts = self.concepts.shape[1]
        if rows == 0:
            raise ValueError("the problem has no rows")
        if num_values == 0:
            raise ValueError("attributes has no columns: nothing to balance")
        self.weights = np.ones(rows) if weights is None else as_vector(
            weights, "weights", rows, positive=True)
        self.total_weight = float(self.weights.sum())
        self.utility = None if utility is None else as_vector(utility, "utility", rows)
        if utility_tilt < 0 or not np.isfinite(utility_tilt):
            raise ValueError(f"utility_tilt must be a finite number >= 0, got {utility_tilt}")
        self.utility_tilt = float(utility_tilt)
        self.utility_mean = 0.0 if self.utility is None else float(
            np.average(self.utility, weights=self.weights))
        if constraint_form not in CONSTRAINT_FORMS:
            raise ValueError(
                f"constraint_form must be one of {CONSTRAINT_FORMS}, got {constraint_form!r}")
        self.keep_rate = check_keep_rate(keep_rate)
        self.min_support = float(min_support)

        groups = [list(range(num_values))
                  ] if groups is None else [list(map(int, g)) for g in groups]
        flat = sorted(c for g in groups for c in g)
        if flat != list(range(num_values)) or any(len(g) == 0 for g in groups):
            raise ValueError(
                f"groups must partition the {num_values} attribute columns, got {groups}")
        attribute_names = list(attribute_names or [f"attribute_{k}" for k in range(num_values)])
        concept_names = list(concept_names or [f"concept_{r}" for r in range(num_concepts)])
        group_names = list(group_names or [f"group_{g}" for g in range(len(groups))])
        if len(attribute_names) != num_values or len(concept_names) != num_concepts or len(
                group_names) != len(groups):
            raise ValueError(
                "attribute_names, concept_names and group_names must match the columns and groups")

        self.spec = ConstraintSpec(
            groups=groups,
            targets=[],
            constraint_form=constraint_form,
            conditional=bool(conditional),
            unit_values=[],
            unit_concepts=[],
            unit_gaps=[],
            attribute_names=attribute_names,
            concept_names=concept_names,
            group_names=group_names,
        )
        annotated = self.spec.annotated(self.attributes)  # (N, n_groups)
        for g, columns in enumerate(groups):
            if not annotated[:, g].any():
                raise ValueError(
                    f"no row has any value of attribute group '{group_names[g]}': nothing to "
                    "balance"
                )
        self.spec.targets = self._resolve_targets(targets, annotated).tolist()

        for r in range(num_concepts):
            if self.concepts[:, r].all():
                raise ValueError(
                    f"concept '{concept_names[r]}' is present in every row: its association "
                    "constraint would only repeat the representation constraint; leave it out")
        if representation_gap is None:
            representation_gap = (DEFAULT_SHARE_GAP if constraint_form == "share"
                                  else DEFAULT_MOMENT_REPRESENTATION_EPS)
        if association_gap is None:
            association_gap = (DEFAULT_SHARE_GAP if constraint_form == "share"
                               else DEFAULT_MOMENT_ASSOCIATION_EPS)
        association_gaps = np.broadcast_to(np.asarray(association_gap, dtype=np.float64),
                                           (num_concepts, ))
        if representation_gap < 0 or (association_gaps < 0).any():
            raise ValueError("gaps must be >= 0")

        # support_gr: annotated weight of concept r in group g; concepts under min_support are out.
        self.support = (annotated * self.weights[:, None]).T @ self.concepts  # (n_groups, c)
        self.excluded_concepts: dict[str, list[str]] = {}
        group_of = self.spec.value_group()
        for k in range(num_values):
            self.spec.unit_values.append(k)
            self.spec.unit_concepts.append(REPRESENTATION)
            self.spec.unit_gaps.append(float(representation_gap))
        for k in range(num_values):
            g = group_of[k]
            for r in range(num_concepts):
                if self.support[g, r] >= self.min_support and self.support[g, r] > 0:
                    self.spec.unit_values.append(k)
                    self.spec.unit_concepts.append(r)
                    self.spec.unit_gaps.append(float(association_gaps[r]))
        for g, name in enumerate(group_names):
            self.excluded_concepts[name] = [
                concept_names[r] for r in range(num_concepts)
                if self.support[g, r] < self.min_support or self.support[g, r] == 0
            ]

    def _resolve_targets(self, targets, annotated: np.ndarray) -> np.ndarray:
        names = self.spec.attribute_names
        group_of = self.spec.value_group()
        if isinstance(targets, str):
            if targets == "uniform":
                return np.array(
                    [1.0 / len(self.spec.groups[group_of[k]]) for k in range(len(names))])
            if targets == "preserve":
                present = self.weights @ self.attributes
                annotated_weight = self.weights @ annotated
                return present / annotated_weight[group_of]
            raise ValueError(f"targets must be 'uniform', 'preserve' or an array, got {targets!r}")
        targets = np.asarray(targets, dtype=np.float64)
        if targets.shape != (len(names),) or not np.isfinite(targets).all():
            raise ValueError(f"targets must be {len(names)} finite numbers, got {targets!r}")
        if ((targets < 0) | (targets > 1)).any():
            raise ValueError(f"targets are shares and must lie in [0, 1], got {targets.tolist()}")
        for g, columns in enumerate(self.spec.groups):
            # Every annotated row shows at least one value of its group, so the shares of a
            # group's values add up to at least 1: targets summing below that cannot be met.
            if self.spec.conditional and targets[columns].sum() < 1 - 1e-9:
                raise ValueError(
                    f"targets of group '{self.spec.group_names[g]}' add up to "
                    f"{targets[columns].sum():.3f} < 1; every annotated row shows at least one "
                    "value, so these shares are contradictory"
                )
        return targets

    # Quantities the solvers share --------------------------------------------------------------

    @property
    def num_rows(self) -> int:
        return self.attributes.shape[0]

    def keep_targets(self, keep_rate: float) -> np.ndarray:
        """t_i = eta + tau (u_i - mean u): the sampling plan M4 stays closest to."""
        if self.utility is None or self.utility_tilt == 0:
            return np.full(self.num_rows, keep_rate)
        return keep_rate + self.utility_tilt * (self.utility - self.utility_mean)

    def constraint_matrix(self) -> tuple[sp.csr_matrix, np.ndarray]:
        """C (N, J), b (J,) for this problem's rows (cached)."""
        if not hasattr(self, "_constraint_matrix"):
            self._constraint_matrix = self.spec.constraint_matrix(self.attributes, self.concepts)
        return self._constraint_matrix

    def unit_matrices(self) -> tuple[sp.csr_matrix, sp.csr_matrix]:
        if not hasattr(self, "_unit_matrices"):
            self._unit_matrices = self.spec.unit_matrices(self.attributes, self.concepts)
        return self._unit_matrices

    def violations(self, q: np.ndarray) -> np.ndarray:
        """max(0, (1/W) C^T (w q) - b) per constraint row, in the problem's units."""
        matrix, bounds = self.constraint_matrix()
        return np.maximum(matrix.T @ (self.weights * q) / self.total_weight - bounds, 0.0)

    def unit_supports(self, q: np.ndarray) -> np.ndarray:
        """Kept annotated weight behind each unit's share, sum w q a y (the denominator of the
        share)."""
        _, scale = self.unit_matrices()
        return scale.T @ (self.weights * q)

    def dropped_units(self, q: np.ndarray) -> np.ndarray:
        """Units whose concept the plan keeps (almost) nothing of: they have no share to certify."""
        kept, original = self.unit_supports(q), self.unit_supports(np.ones(self.num_rows))
        return kept <= np.maximum(DROPPED_FRACTION * original, DROPPED_SUPPORT)

    def share_excess(self, q: np.ndarray) -> np.ndarray:
        """Per constraint unit, how far the kept data's share lies outside target ± gap, as a share
        (0 inside; 0 for a unit whose concept the plan dropped, which has no share: dropped_units).

        Share form only: the certificate in the user's units whatever W is (DESIGN.md: a moment
        violation v allows a share excess of v W / K for a concept with kept annotated support K).
        """
        if self.spec.constraint_form != "share":
            raise ValueError(
                "share_excess is for the share form; the moment form is certified by violations()")
        base, _ = self.unit_matrices()
        kept = self.weights * q
        offset = base.T @ kept  # sum w q (s - pi a) y = (share - target) * support
        support = self.unit_supports(q)
        excess = np.zeros(self.spec.num_units)
        present = ~self.dropped_units(q)
        excess[present] = (
            np.abs(offset[present]) / support[present] - np.asarray(self.spec.unit_gaps)[present]
        )
        return np.maximum(excess, 0.0)

    def certified_violation(self, q: np.ndarray) -> float:
        """The largest constraint violation in the user's units: a share (share form) or a
        moment."""
        if self.spec.constraint_form == "share":
            return float(self.share_excess(q).max(initial=0.0))
        return float(self.violations(q).max(initial=0.0))

    def objective(self, q: np.ndarray, keep_rate: float) -> float:
        """1/2 sum_i w_i (q_i - t_i)^2 (DESIGN.md)."""
        return 0.5 * float(self.weights @ (q - self.keep_targets(keep_rate)) ** 2)
