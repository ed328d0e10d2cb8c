"""A solved M4 problem: keep probabilities, duals, certificates, and how to apply it to new rows.

`BalanceSolution` is what travels to every worker (solution.json): small, pure data.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

from solvers.spec import ConstraintSpec

SOLUTION_FORMAT_VERSION = 1


@dataclasses.dataclass
class BalanceSolution:
    """q_i = clip(t_i - (C lambda)_i - nu, 0, 1), with t_i = eta + tau (u_i - mean u).

    `constraint_duals` holds lambda (one non-negative number per constraint row of `spec`, upper
    rows then lower rows) and `rate_dual` nu (the rate multiplier). `q` is the keep probability of
    the rows the problem was solved on (None after `from_json`: the solution applies to any rows
    through `q_for`).
    """

    spec: ConstraintSpec
    keep_rate: float
    constraint_duals: np.ndarray
    rate_dual: float
    utility_tilt: float = 0.0
    utility_mean: float = 0.0
    q: np.ndarray | None = None
    objective: float = float("nan")
    max_violation: float = float("nan")
    duality_gap: float = float("nan")
    status: str = "unknown"
    method: str = ""
    statistics: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Exact-count sampling: signature text -> [rows n_s, rows to keep k_s] (solvers/rounding.py),
    # filled in by the caller that knows the signature texts; None when not computed.
    exact_counts: dict[str, list[int]] | None = None

    @property
    def certified_violation(self) -> float | None:
        """The largest constraint excess in the user's units (a share, in the share form), if
        measured."""
        value = self.statistics.get("certified_violation")
        return None if value is None else float(value)

    def certificate(self) -> str:
        """The solver's word, in words: the status and what it guarantees about the constraints."""
        units = "a share" if self.spec.constraint_form == "share" else "a moment"
        measured = self.certified_violation
        if measured is None:
            return f"{self.status} ({self.method}); no certificate was measured"
        if self.status == "optimal":
            return (
                f"optimal ({self.method}): every constrained value is within its gap (largest "
                f"excess {measured:.1e} as {units})")
        return (
            f"{self.status} ({self.method}): NOT certified; a constrained value is off its gap by "
            f"up to {measured:.3g} as {units}")

    def q_for(self, attributes, concepts, utility=None) -> np.ndarray:
        """Keep probability of any rows, seen or not, from their features and the duals."""
        matrix, _ = self.spec.constraint_matrix(attributes, concepts)
        rows = matrix.shape[0]
        targets = np.full(rows, self.keep_rate)
        if self.utility_tilt:
            if utility is None:
                raise ValueError("this solution was tilted toward utility; pass the rows' utility")
            targets = targets + self.utility_tilt * (
                np.asarray(utility, dtype=np.float64) - self.utility_mean
            )
        return np.clip(targets - matrix @ self.constraint_duals - self.rate_dual, 0.0, 1.0)

    def to_json(self) -> str:
        payload = {
            "format_version": SOLUTION_FORMAT_VERSION,
            "status": self.status,
            "method": self.method,
            "keep_rate": self.keep_rate,
            "objective": self.objective,
            "max_violation": self.max_violation,
            "duality_gap": self.duality_gap,
            "utility_tilt": self.utility_tilt,
            "utility_mean": self.utility_mean,
            "rate_dual": self.rate_dual,
            "constraint_duals": np.asarray(self.constraint_duals, dtype=np.float64).tolist(),
            "spec": self.spec.to_dict(),
            "statistics": self.statistics,
            "exact_counts": self.exact_counts,
        }
        return json.dumps(payload, indent=1, default=_json_default, allow_nan=True)

    @classmethod
    def from_json(cls, text: str) -> "BalanceSolution":
        payload = json.loads(text)
        version = payload.get("format_version")
        if version != SOLUTION_FORMAT_VERSION:
            raise ValueError(
                f"solution format version {version!r} is not supported "
                f"(expected {SOLUTION_FORMAT_VERSION})"
            )
        return cls(
            spec=ConstraintSpec.from_dict(payload["spec"]),
            keep_rate=float(payload["keep_rate"]),
            constraint_duals=np.asarray(payload["constraint_duals"], dtype=np.float64),
            rate_dual=float(payload["rate_dual"]),
            utility_tilt=float(payload["utility_tilt"]),
            utility_mean=float(payload["utility_mean"]),
            objective=float(payload["objective"]),
            max_violation=float(payload["max_violation"]),
            duality_gap=float(payload["duality_gap"]),
            status=payload["status"],
            method=payload["method"],
            statistics=payload.get("statistics", {}),
            exact_counts=payload.get("exact_counts"),
        )


def _json_default(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to solution.json")
