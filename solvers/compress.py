"""Signature compression: rows with the same (attributes, concepts, utility) get the same q.

Merging them into one weighted row is exact (DESIGN.md, "Signature compression") and is what
makes the solve independent of N.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from solvers.problem import BalanceProblem
from solvers.spec import as_indicator, as_vector


@dataclasses.dataclass
class CompressedRows:
    """Unique signatures, their summed weights (`counts`), and `inverse[i]`: the signature of row i.
    """

    attributes: np.ndarray   # (S, m)
    concepts: np.ndarray     # (S, c)
    utility: np.ndarray | None  # (S,) or None
    counts: np.ndarray       # (S,) summed row weights
    inverse: np.ndarray      # (N,) int64

    @property
    def num_signatures(self) -> int:
        return len(self.counts)

    @property
    def num_rows(self) -> int:
        return len(self.inverse)

    def expand(self, q_signatures) -> np.ndarray:
        """Per-row values (e.g. keep probabilities) from per-signature ones."""
        q_signatures = np.asarray(q_signatures)
        if q_signatures.shape[0] != self.num_signatures:
            raise ValueError(
                f"expected {self.num_signatures} per-signature values, got {q_signatures.shape[0]}")
        return q_signatures[self.inverse]


def compress(attributes, concepts, utility=None, weights=None) -> CompressedRows:
    """Group rows by signature, the utility (when given) part of it: exact, so q is the full
    problem's. A caller wanting fewer signatures rounds its utility first."""
    attributes = as_indicator(attributes, "attributes")
    rows = attributes.shape[0]
    concepts = as_indicator(concepts, "concepts", rows)
    weights = np.ones(rows) if weights is None else as_vector(weights, "weights", rows,
                                                               positive=True)
    # One byte string per row: the indicator bits packed 8 to a byte, then the utility's float
    # bytes.
    parts = [np.packbits(attributes != 0, axis=1), np.packbits(concepts != 0, axis=1)]
    if utility is not None:
        utility = as_vector(utility, "utility", rows)
        utility = utility + 0.0  # -0.0 and 0.0 are the same utility
        parts.append(utility.astype(np.float64).reshape(rows, 1).view(np.uint8))
    packed = np.ascontiguousarray(np.hstack(parts))
    keys = packed.view(np.dtype((np.void, packed.shape[1]))).reshape(rows)
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    inverse = inverse.reshape(rows).astype(np.int64)
    counts = np.bincount(inverse, weights=weights, minlength=len(first))
    return CompressedRows(
        attributes=attributes[first], concepts=concepts[first],
        utility=None if utility is None else utility[first], counts=counts, inverse=inverse)


def compress_problem(problem: BalanceProblem) -> tuple[BalanceProblem, np.ndarray]:
    """The same problem on signatures (weights = counts) and the row -> signature map.

    Utility is part of the signature only when it changes q (utility_tilt > 0).
    """
    uses_utility = problem.utility is not None and problem.utility_tilt > 0
    rows = compress(problem.attributes, problem.concepts, problem.utility if uses_utility else None,
                    weights=problem.weights)
    compressed = BalanceProblem(rows.attributes, rows.concepts, weights=rows.counts,
                                utility=rows.utility if uses_utility else None, **problem.options)
    return compressed, rows.inverse
