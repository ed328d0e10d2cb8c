"""Constraint signatures: what M4 sees of an example (attribute values, concepts, utility bucket).

Rows with equal signatures share one keep probability, so balance counts signatures (Beam) and
solves on the counts in memory; resample turns one record's features into matrix rows the same way.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Iterable, Sequence

import numpy as np

# Utility is bucketed to this many decimals before counting (DESIGN.md: "bucket u otherwise"):
# quality scores in [0, 1] then give at most 101 buckets per (attributes, concepts) pattern.
UTILITY_DECIMALS = 2
# Label of an attribute value that names no group ("woman" instead of "perceived_gender:woman").
DEFAULT_GROUP = "attribute"


def split_label(label: str) -> tuple[str, str]:
    """'perceived_gender:woman' -> ('perceived_gender', 'woman'); 'woman' -> (DEFAULT_GROUP,
    'woman').

    The one parse of an attribute label: the lexicon, the combination policies and the signatures
    all call it."""
    group, separator, value = label.partition(":")
    return (group, value) if separator else (DEFAULT_GROUP, label)


def group_of(label: str) -> str:
    """'perceived_gender:woman' -> 'perceived_gender'."""
    return split_label(label)[0]


def row_signature(attributes: Iterable[str], concepts: Iterable[str], utility=None, *,
                  conditional: bool = True, use_utility: bool = False) -> str:
    """Canonical text of what M4 sees of one row (a JSON list, so it travels as a Beam key).

    In the conditional form a row without any attribute value has g = 0 in every constraint, so
    its concepts do not matter: they are dropped and all such rows count as one signature.
    """
    attributes = sorted(set(attributes or ()))
    concepts = sorted(set(concepts or ())) if (attributes or not conditional) else []
    bucket = None
    if use_utility and utility is not None and np.isfinite(utility):
        bucket = round(float(utility), UTILITY_DECIMALS)
    return json.dumps([attributes, concepts, bucket], separators=(",", ":"))


def parse_signature(text: str) -> tuple[list[str], list[str], float | None]:
    attributes, concepts, utility = json.loads(text)
    return attributes, concepts, utility


@dataclasses.dataclass
class SignatureTable:
    """Counted signatures as the matrices `solvers/` reads: one row per signature, weight = count.
    """

    attribute_names: list[str]
    concept_names: list[str]
    attributes: np.ndarray  # (S, m) 0/1
    concepts: np.ndarray  # (S, c) 0/1
    weights: np.ndarray  # (S,) counts
    utility: np.ndarray | None  # (S,) or None when no row has one
    # (S,) True where the rows had no score (their utility above is the filled-in mean), or None
    utility_missing: np.ndarray | None = None

    @property
    def group_names(self) -> list[str]:
        return sorted({group_of(label) for label in self.attribute_names})

    @property
    def groups(self) -> list[list[int]]:
        """Attribute columns of each group, in group_names order."""
        return [[k for k, label in enumerate(self.attribute_names) if group_of(label) == group]
                for group in self.group_names]

    @property
    def num_rows(self) -> int:
        return int(self.weights.sum())

    @classmethod
    def from_counts(cls, counts: Iterable[tuple[str, int]]) -> "SignatureTable":
        """Build from (signature text, count) pairs, in a deterministic (sorted) row order."""
        parsed = [(parse_signature(text), int(count)) for text, count in counts if int(count) > 0]
        # Rows with a utility bucket and rows without one (None) sort apart instead of failing.
        rows = sorted(parsed,
                      key=lambda row: (row[0][0], row[0][1], row[0][2] is None, row[0][2] or 0.0))
        attribute_names = sorted({a for (attributes, _, _), _ in rows for a in attributes})
        concept_names = sorted({c for (_, concepts, _), _ in rows for c in concepts})
        attributes = encode([r[0][0] for r in rows], attribute_names)
        concepts = encode([r[0][1] for r in rows], concept_names)
        weights = np.array([count for _, count in rows], dtype=np.float64)
        utilities = [r[0][2] for r in rows]
        utility = None
        if any(u is not None for u in utilities):
            known = np.array([u for u in utilities if u is not None], dtype=np.float64)
            known_weights = np.array([w for u, w in zip(utilities, weights) if u is not None])
            # A row without a score gets the mean score: its target keep rate is then eta.
            fill = float(np.average(known, weights=known_weights))
            utility = np.array([fill if u is None else u for u in utilities], dtype=np.float64)
            return cls(attribute_names, concept_names, attributes, concepts, weights, utility,
                       np.array([u is None for u in utilities]))
        return cls(attribute_names, concept_names, attributes, concepts, weights, utility)

    def project(self, concept_names: Sequence[str]) -> "SignatureTable":
        """Keep only `concept_names` (in that order) and merge rows that become identical."""
        missing = [name for name in concept_names if name not in self.concept_names]
        if missing:
            raise ValueError(f"concepts not in the table: {missing}")
        columns = [self.concept_names.index(name) for name in concept_names]
        concepts = self.concepts[:, columns]
        parts = [self.attributes, concepts]
        if self.utility is not None:
            parts.append(self.utility[:, None])
            missing = self.utility_missing if self.utility_missing is not None else np.zeros(
                len(self.weights))
            parts.append(np.asarray(missing, dtype=np.float64)[:, None])
        stacked = np.hstack(parts)
        unique, inverse = np.unique(stacked, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        weights = np.bincount(inverse, weights=self.weights, minlength=len(unique))
        m, c = self.attributes.shape[1], len(columns)
        utility = unique[:, m + c] if self.utility is not None else None
        missing = unique[:, m + c + 1] > 0 if self.utility is not None else None
        return SignatureTable(list(self.attribute_names), list(concept_names), unique[:, :m],
                              unique[:, m:m + c], weights, utility, missing)

    def signature_texts(self, conditional: bool = True, use_utility: bool = False) -> list[str]:
        """Each row's signature text, as `row_signature` writes it for a record with the same labels
        (what resample's KeepRule computes for a record, so the two can be matched)."""
        texts = []
        for i in range(len(self.weights)):
            utility = None
            missing = self.utility_missing is not None and self.utility_missing[i]
            if self.utility is not None and not missing:
                utility = float(self.utility[i])
            texts.append(
                row_signature([self.attribute_names[k] for k in np.flatnonzero(self.attributes[i])],
                              [self.concept_names[r] for r in np.flatnonzero(self.concepts[i])],
                              utility, conditional=conditional, use_utility=use_utility))
        return texts

    def to_records(self) -> list[dict]:
        """JSON-ready rows: {"attributes": [...], "concepts": [...], "utility": u, "count": n}."""
        records = []
        for i in range(len(self.weights)):
            records.append({
                "attributes": [self.attribute_names[k] for k in np.flatnonzero(self.attributes[i])],
                "concepts": [self.concept_names[r] for r in np.flatnonzero(self.concepts[i])],
                "utility": None if self.utility is None else float(self.utility[i]),
                "count": int(self.weights[i]),
            })
        return records

    @classmethod
    def from_records(cls, records: Iterable[dict]) -> "SignatureTable":
        counts = {}
        for record in records:
            text = row_signature(record["attributes"], record["concepts"], record.get("utility"),
                                 conditional=False, use_utility=True)
            counts[text] = counts.get(text, 0) + int(record["count"])
        return cls.from_counts(counts.items())


def encode(rows: Sequence[Iterable[str]], names: Sequence[str]) -> np.ndarray:
    """0/1 matrix (len(rows), len(names)); labels not in `names` are ignored."""
    index = {name: j for j, name in enumerate(names)}
    matrix = np.zeros((len(rows), len(names)), dtype=np.float64)
    for i, labels in enumerate(rows):
        for label in labels:
            j = index.get(label)
            if j is not None:
                matrix[i, j] = 1.0
    return matrix
