"""M4's constraints in one canonical linear form: the constrained (value, concept) units and the
matrix C and bounds b that every solver reads, built from 0/1 attribute and concept rows.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import scipy.sparse as sp

CONSTRAINT_FORMS = ("share", "moment")
REPRESENTATION = -1  # concept index of a representation unit


def as_indicator(array, name: str, rows: int | None = None) -> np.ndarray:
    """Check a 0/1 matrix and return it as float64 (N, k)."""
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D (rows x columns) 0/1 array, got shape {array.shape}")
    if rows is not None and array.shape[0] != rows:
        raise ValueError(f"{name} has {array.shape[0]} rows but attributes has {rows}")
    values = array.astype(np.float64, copy=False)
    if np.isnan(values).any():
        raise ValueError(f"{name} contains NaN; indicators must be 0 or 1")
    if not np.isin(values, (0.0, 1.0)).all():
        raise ValueError(f"{name} must contain only 0 and 1")
    return values


def as_vector(values, name: str, rows: int, *, positive: bool = False) -> np.ndarray:
    """Check a per-row vector (finite, `rows` long, optionally positive); return it as float64."""
    values = np.asarray(values, dtype=np.float64)
    if values.shape != (rows,):
        raise ValueError(f"{name} must have shape ({rows},), got {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    if positive and (values <= 0).any():
        raise ValueError(f"{name} must be positive")
    return values


@dataclasses.dataclass
class ConstraintSpec:
    """Everything needed to turn (attributes, concepts) rows into constraint coefficients.

    Constraint *units* u are (value k, concept r) pairs, r = REPRESENTATION (-1) for the
    representation unit of k. Each unit has an upper and a lower row, so J = 2 U rows in all:

        (1/W) sum_i w_i q_i C_ij <= b_j        with  C = [B - G*S, -B - G*S]  (share form)
                                                      C = [B, -B], b = eps    (moment form)

    where B_iu = v_ik y_ir (v_ik = s_ik - pi_k a_ig(k)), S_iu = a_ig(k) y_ir and G the unit's gap.
    """

    groups: list[list[int]]
    targets: list[float]
    constraint_form: str
    conditional: bool
    unit_values: list[int]
    unit_concepts: list[int]
    unit_gaps: list[float]
    attribute_names: list[str]
    concept_names: list[str]
    group_names: list[str]

    @property
    def num_units(self) -> int:
        return len(self.unit_values)

    @property
    def num_constraints(self) -> int:
        return 2 * self.num_units

    def value_group(self) -> np.ndarray:
        """Index of the group of each attribute column."""
        group_of = np.empty(sum(len(columns) for columns in self.groups), dtype=np.int64)
        for g, columns in enumerate(self.groups):
            group_of[columns] = g
        return group_of

    def annotated(self, attributes: np.ndarray) -> np.ndarray:
        """a_ig: (N, n_groups), 1 where any value of group g is present (all 1 if unconditional)."""
        rows = attributes.shape[0]
        if not self.conditional:
            return np.ones((rows, len(self.groups)))
        return np.stack([attributes[:, cols].max(axis=1) for cols in self.groups], axis=1)

    def unit_matrices(self, attributes, concepts) -> tuple[sp.csr_matrix, sp.csr_matrix]:
        """B (N, U) = v_k y_r and S (N, U) = a_g(k) y_r for every unit, as sparse matrices."""
        attributes = as_indicator(attributes, "attributes")
        concepts = as_indicator(concepts, "concepts", attributes.shape[0])
        if attributes.shape[1] != len(self.targets):
            raise ValueError(
                f"attributes has {attributes.shape[1]} columns, the problem has {len(self.targets)}"
            )
        if concepts.shape[1] != len(self.concept_names):
            raise ValueError(
                f"concepts has {concepts.shape[1]} columns, the problem has "
                f"{len(self.concept_names)}"
            )
        annotated_by_value = self.annotated(attributes)[:, self.value_group()]  # (N, m)
        centred = attributes - np.asarray(self.targets) * annotated_by_value  # v (N, m)
        values = np.asarray(self.unit_values)
        unit_concepts = np.asarray(self.unit_concepts)
        # y_ir for each unit; representation units use y = 1 (and need no concept column at all).
        is_representation = unit_concepts == REPRESENTATION
        ones = sp.csc_matrix(np.ones((attributes.shape[0], int(is_representation.sum()))))
        concept_columns = sp.csc_matrix(concepts)[:, unit_concepts[~is_representation]]
        unit_y = sp.hstack([ones, concept_columns], format="csc")
        order = np.concatenate(
            [np.flatnonzero(is_representation),
             np.flatnonzero(~is_representation)])
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        unit_y = unit_y[:, inverse]
        base = sp.csr_matrix(unit_y.multiply(centred[:, values]))
        scale = sp.csr_matrix(unit_y.multiply(annotated_by_value[:, values]))
        base.eliminate_zeros()
        scale.eliminate_zeros()
        return base, scale

    def constraint_matrix(self, attributes, concepts) -> tuple[sp.csr_matrix, np.ndarray]:
        """C (N, J) and b (J,) of  (1/W) sum_i w_i q_i C_ij <= b_j."""
        base, scale = self.unit_matrices(attributes, concepts)
        gaps = np.asarray(self.unit_gaps)
        if self.constraint_form == "share":
            gap_scale = scale @ sp.diags(gaps)
            matrix = sp.hstack([base - gap_scale, -base - gap_scale], format="csr")
            bounds = np.zeros(self.num_constraints)
        else:
            matrix = sp.hstack([base, -base], format="csr")
            bounds = np.concatenate([gaps, gaps])
        return matrix, bounds

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ConstraintSpec":
        return cls(**data)
