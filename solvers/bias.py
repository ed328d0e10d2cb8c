"""How biased a data set is: attribute shares, share gaps and M4 moments, before or after balancing.

The numbers DESIGN.md defines ("Bias of a dataset"), with supports, as arrays and as JSON.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from solvers.problem import DEFAULT_MIN_SUPPORT, DROPPED_FRACTION, DROPPED_SUPPORT
from solvers.spec import as_indicator, as_vector


@dataclasses.dataclass
class DataBias:
    """Shares and gaps per attribute value k and per (value k, concept r); NaN where undefined.

    `support[k, r]` is the annotated weight of concept r in k's group on the data *before* q
    (so the same pairs are measured before and after balancing); `kept_support` is it with q.
    """

    attribute_names: list[str]
    concept_names: list[str]
    group_names: list[str]
    groups: list[list[int]]
    targets: np.ndarray                 # pi_k (m,)
    conditional: bool
    min_support: float
    total_weight: float                 # W = sum w
    kept_weight: float                  # sum w q
    value_share: np.ndarray             # share_k (m,)
    value_gap: np.ndarray               # |share_k - pi_k| (m,)
    representation_moment: np.ndarray   # R_k (m,)
    concept_share: np.ndarray           # share_k|r (m, c)
    concept_gap: np.ndarray             # |share_k|r - pi_k| (m, c)
    association_moment: np.ndarray      # A_kr (m, c)
    support: np.ndarray                 # sum w a_g(k) y_r, before q (m, c)
    kept_support: np.ndarray            # sum w q a_g(k) y_r (m, c)
    # support >= min_support, and not dropped: pairs in data AB (m, c)
    measured: np.ndarray
    # q keeps (almost) none of the pair's rows: no share to measure (m, c)
    dropped: np.ndarray

    @property
    def representation_bias(self) -> float:
        """Data RB = max_k |share_k - pi_k|."""
        return _nanmax(self.value_gap)

    @property
    def association_bias_max(self) -> float:
        """Data AB = max over measured (k, r) of |share_k|r - pi_k|."""
        return _nanmax(self.concept_gap[self.measured])

    @property
    def association_bias_mean(self) -> float:
        """Support-weighted mean of |share_k|r - pi_k| over measured (k, r)."""
        gaps = self.concept_gap[self.measured]
        weights = self.support[self.measured]
        usable = np.isfinite(gaps)
        if not usable.any() or weights[usable].sum() == 0:
            return float("nan")
        return float(np.average(gaps[usable], weights=weights[usable]))

    def worst_association(self) -> dict | None:
        """The measured pair with the largest gap, in words and numbers."""
        gaps = np.where(self.measured & np.isfinite(self.concept_gap), self.concept_gap, -np.inf)
        if not np.isfinite(gaps).any():
            return None
        k, r = np.unravel_index(int(np.argmax(gaps)), gaps.shape)
        return {"value": self.attribute_names[k], "concept": self.concept_names[r],
                "share": float(self.concept_share[k, r]), "target": float(self.targets[k]),
                "gap": float(self.concept_gap[k, r]), "support": float(self.support[k, r])}

    def dropped_concepts(self) -> list[str]:
        """Concepts with enough support that q keeps none of: left out of AB, named here instead."""
        eligible = (self.support >= self.min_support) & (self.support > 0)
        return [name for r, name in enumerate(self.concept_names)
                if eligible[:, r].any() and self.dropped[eligible[:, r], r].all()]

    def summary(self) -> dict:
        return {
            "representation_bias": self.representation_bias,
            "association_bias_max": self.association_bias_max,
            "association_bias_mean": self.association_bias_mean,
            "worst_association": self.worst_association(),
            "pairs_measured": int(self.measured.sum()),
            "pairs_below_min_support": int((self.support < self.min_support).sum()),
            "concepts_dropped": self.dropped_concepts(),
            "total_weight": self.total_weight,
            "kept_weight": self.kept_weight,
            "keep_rate": (self.kept_weight / self.total_weight if self.total_weight
                          else float("nan")),
        }

    def to_dict(self) -> dict:
        """JSON-ready: NaN (a share of nothing) becomes None."""
        group_of = {k: g for g, cols in enumerate(self.groups) for k in cols}
        values = {
            name: {"group": self.group_names[group_of[k]], "share": _number(self.value_share[k]),
                   "target": float(self.targets[k]), "gap": _number(self.value_gap[k]),
                   "moment": _number(self.representation_moment[k])}
            for k, name in enumerate(self.attribute_names)}
        concepts = {}
        for r, concept in enumerate(self.concept_names):
            concepts[concept] = {
                "support": {
                    self.group_names[g]: float(self.support[cols[0], r])
                    for g, cols in enumerate(self.groups)
                },
                "kept_support": {
                    self.group_names[g]: float(self.kept_support[cols[0], r])
                    for g, cols in enumerate(self.groups)
                },
                "shares": {
                    v: _number(self.concept_share[k, r])
                    for k, v in enumerate(self.attribute_names)
                },
                "gaps": {
                    v: _number(self.concept_gap[k, r])
                    for k, v in enumerate(self.attribute_names)
                },
                "moments": {
                    v: _number(self.association_moment[k, r])
                    for k, v in enumerate(self.attribute_names)
                },
                "measured": {
                    v: bool(self.measured[k, r])
                    for k, v in enumerate(self.attribute_names)
                },
            }
        summary = {key: (_number(value) if isinstance(value, float) else value)
                   for key, value in self.summary().items()}
        return {"conditional": self.conditional, "min_support": self.min_support, "values": values,
                "concepts": concepts, "summary": summary}


def data_bias(attributes, concepts, q=None, weights=None, targets="uniform", groups=None,
              conditional: bool = True, min_support: float = DEFAULT_MIN_SUPPORT,
              attribute_names: Sequence[str] | None = None,
              concept_names: Sequence[str] | None = None,
              group_names: Sequence[str] | None = None) -> DataBias:
    """Shares, gaps and moments of the data kept with probabilities q (q = 1: the data as it is).

    share_k = sum w q s_k / sum w q a_g(k),  share_k|r = sum w q s_k y_r / sum w q a y_r,
    R_k = (1/W) sum w q (s_k - pi_k a),  A_kr = (1/W) sum w q (s_k - pi_k a) y_r,  W = sum w.
    """
    attributes = as_indicator(attributes, "attributes")
    rows, num_values = attributes.shape
    concepts = as_indicator(concepts, "concepts", rows)
    weights = np.ones(rows) if weights is None else as_vector(weights, "weights", rows)
    if (weights < 0).any():
        raise ValueError("weights must be >= 0")
    q = np.ones(rows) if q is None else as_vector(q, "q", rows)
    if ((q < 0) | (q > 1)).any():
        raise ValueError("q holds keep probabilities and must lie in [0, 1]")
    groups = [list(range(num_values))] if groups is None else [list(map(int, g)) for g in groups]
    if sorted(c for g in groups for c in g) != list(range(num_values)):
        raise ValueError(f"groups must partition the {num_values} attribute columns, got {groups}")
    group_of = np.empty(num_values, dtype=np.int64)
    for g, cols in enumerate(groups):
        group_of[cols] = g
    attribute_names = list(attribute_names or [f"attribute_{k}" for k in range(num_values)])
    concept_names = list(concept_names or [f"concept_{r}" for r in range(concepts.shape[1])])
    group_names = list(group_names or [f"group_{g}" for g in range(len(groups))])

    if conditional:
        # a (N, m)
        annotated = np.stack([attributes[:, cols].max(axis=1) for cols in groups], axis=1)[:,
                                                                                           group_of]
    else:
        annotated = np.ones_like(attributes)
    total_weight = float(weights.sum())
    kept = weights * q
    pi = _targets(targets, attributes, annotated, weights, groups, num_values)

    centred = attributes - pi * annotated                               # v = s - pi a  (N, m)
    with np.errstate(divide="ignore", invalid="ignore"):
        value_share = (kept @ attributes) / (kept @ annotated)
        concept_share = ((attributes * kept[:, None]).T @ concepts) / (
            (annotated * kept[:, None]).T @ concepts)
        representation_moment = (kept @ centred) / total_weight
        association_moment = ((centred * kept[:, None]).T @ concepts) / total_weight
    support = (annotated * weights[:, None]).T @ concepts
    kept_support = (annotated * kept[:, None]).T @ concepts
    dropped = (support > 0) & (kept_support <= np.maximum(DROPPED_FRACTION * support,
                                                          DROPPED_SUPPORT))
    return DataBias(
        attribute_names=attribute_names, concept_names=concept_names, group_names=group_names,
        groups=groups, targets=pi, conditional=bool(conditional), min_support=float(min_support),
        total_weight=total_weight, kept_weight=float(kept.sum()), value_share=value_share,
        value_gap=np.abs(value_share - pi), representation_moment=representation_moment,
        concept_share=concept_share, concept_gap=np.abs(concept_share - pi[:, None]),
        association_moment=association_moment, support=support, kept_support=kept_support,
        measured=(support >= min_support) & (support > 0) & ~dropped, dropped=dropped)


def _targets(targets, attributes, annotated, weights, groups, num_values) -> np.ndarray:
    if isinstance(targets, str):
        if targets == "uniform":
            sizes = np.empty(num_values)
            for cols in groups:
                sizes[cols] = len(cols)
            return 1.0 / sizes
        if targets == "preserve":
            with np.errstate(divide="ignore", invalid="ignore"):
                return (weights @ attributes) / (weights @ annotated)
        raise ValueError(f"targets must be 'uniform', 'preserve' or an array, got {targets!r}")
    targets = np.asarray(targets, dtype=np.float64)
    if targets.shape != (num_values,) or not np.isfinite(targets).all():
        raise ValueError(f"targets must be {num_values} finite numbers, got {targets!r}")
    return targets


def _nanmax(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.max()) if finite.size else float("nan")


def _number(value) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else None
