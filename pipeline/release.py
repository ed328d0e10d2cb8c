"""What resample decides, as pure functions: keep probability, copies, order and released samples
(the tar shards they go into: pipeline/tars.py).

No Beam here: the resample job calls these per record, and tests call them directly.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems

from pipeline import hashing
from pipeline.errors import DataError
from pipeline.records import LabelSetMemo, distinct_label_sets, label_set_parts
from pipeline.signatures import encode, parse_signature, row_signature
from solvers.solution import BalanceSolution

MODES = ("exact", "bernoulli", "weights", "repeat")
# exact: k_s whole rows of every constrained signature (balance's integer program), so the release
# meets the gaps in its own counts; bernoulli draws each row on its own (a concept of 50 rows then
# moves by about 0.1 in share).
DEFAULT_MODE = "exact"
DEFAULT_SEED = 0
DEFAULT_PREFIX = "balanced"
# img2dataset writes 10,000 samples per shard; 1,000 keeps a shard of web images (~100 kB each)
# near 100 MB, which one worker holds in memory while writing it.
DEFAULT_SAMPLES_PER_SHARD = 1000
# Repeat mode does systematic sampling in integers: q is scaled to this many units, so running
# sums are exact and the output size is exactly the one asked for.
REPEAT_MASS_UNITS = 1 << 32


class KeepRule:
    """Keep probability and copies of a record from its features, the solution and the seed.

    A pure function of (features, solution, seed), memoised by signature: rows with the same
    signature have the same q, so a worker computes q once per signature it meets. Its own default
    mode is bernoulli, which any solution supports; resample's default, exact, needs the exact
    counts balance adds to solution.json.
    """

    def __init__(self, solution: BalanceSolution, seed: int = DEFAULT_SEED,
                 mode: str = "bernoulli"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "exact" and solution.exact_counts is None:
            raise DataError(
                "this solution has no exact counts (an older balance, or its integer program "
                "failed: see solution.json statistics.exact_counts); re-run balance, or resample "
                "with --mode bernoulli")
        self.solution = solution
        self.seed = int(seed)
        self.mode = mode
        self.attribute_names = list(solution.spec.attribute_names)
        self.concept_names = list(solution.spec.concept_names)
        self._known_attributes = set(self.attribute_names)
        self._known_concepts = set(self.concept_names)
        self._memo: dict[str, float] = {}
        self._row_memo = LabelSetMemo()  # label set -> signature
        self._text_memo = LabelSetMemo()  # label set's text -> (signature, q), no utility tilt

    def signature(self, attributes, concepts, utility=None) -> str:
        """Signature over the solution's own columns (unknown labels do not change q)."""
        attributes = [a for a in attributes or () if a in self._known_attributes]
        concepts = [c for c in concepts or () if c in self._known_concepts]
        return row_signature(attributes, concepts, utility,
                             conditional=self.solution.spec.conditional,
                             use_utility=bool(self.solution.utility_tilt))

    def keep_probability(self, attributes, concepts, utility=None) -> float:
        """q of a row: a function of its signature alone (utility as its bucket, as balance counted
        it), so every row of a signature has the same q whichever row a worker meets first."""
        return self.signatures_and_probabilities([(attributes, concepts, utility)])[0][1]

    def signatures_and_probabilities(self, rows) -> list[tuple[str, float]]:
        """(signature, q) of many (attributes, concepts, utility) rows.

        The q of every signature not met before comes from one vectorised `q_for` over all of them:
        building the constraint rows costs milliseconds per call, and a table has thousands of
        signatures. Signatures are memoised on the labels as given (rows repeat a few label sets).
        """
        use_utility = bool(self.solution.utility_tilt)
        texts = []
        for attributes, concepts, utility in rows:
            memo_key = (tuple(attributes or ()), tuple(concepts or ()),
                        utility if use_utility else None)
            texts.append(self._row_memo.get_or_make(
                memo_key, lambda: self.signature(attributes, concepts, utility)))
        unseen = sorted({text for text in texts if text not in self._memo})
        if unseen:
            parsed = [parse_signature(text) for text in unseen]
            utilities = None
            # the bucket balance counted; None: no usable score, the mean's target rate
            if use_utility:
                utilities = np.array([self.solution.utility_mean if bucket is None else bucket
                                      for _, _, bucket in parsed])
            q = self.solution.q_for(encode([a for a, _, _ in parsed], self.attribute_names),
                                    encode([c for _, c, _ in parsed], self.concept_names),
                                    utilities)
            self._memo.update(zip(unseen, q.tolist()))
        return [(text, self._memo[text]) for text in texts]

    def table_signatures(self, table: pa.Table) -> tuple[np.ndarray, list[str], np.ndarray]:
        """(per row the index of its signature, the signatures, their q) of an annotation table.

        The table's distinct (attributes, concepts) pairs are found in Arrow and each gets its
        signature once, so a table costs no Python per row. With utility tilt (each row's utility
        is part of its signature), or labels holding the separator characters, it goes row by row.
        """
        distinct = None if self.solution.utility_tilt else distinct_label_sets(table)
        if distinct is None:
            decided = self.signatures_and_probabilities(zip(
                table.column("attributes").to_pylist(), table.column("concepts").to_pylist(),
                table.column("utility").to_pylist()))
            of_label_set = None
        else:
            of_label_set, texts = distinct
            decided = self._by_label_set_text(texts)
        signatures = sorted({signature for signature, _ in decided})
        index = {signature: i for i, signature in enumerate(signatures)}
        q = dict(decided)
        codes = np.array([index[signature] for signature, _ in decided], dtype=np.int64)
        return (codes if of_label_set is None else codes[of_label_set], signatures,
                np.array([q[signature] for signature in signatures], dtype=float))

    def _by_label_set_text(self, texts) -> list[tuple[str, float]]:
        """signatures_and_probabilities of label sets given as their text
        (records.distinct_label_sets), memoised on the text: one lookup for a label set met before.
        """
        found = {text: self._text_memo.get(text) for text in texts}
        unseen = [text for text, value in found.items() if value is None]
        if unseen:
            decided = self.signatures_and_probabilities(
                (*label_set_parts(text), None) for text in unseen)
            for text, value in zip(unseen, decided):
                found[text] = self._text_memo.put(text, value)
        return [found[text] for text in texts]

    def exact_signature(self, signature: str):
        """(n_s, k_s) when exact mode keeps exactly k_s of the n_s rows of this signature by rank,
        else None.

        Signatures no constraint sees (rows without an annotated attribute), and those kept whole or
        not at all, need no ranking: they are drawn by probability, or kept or dropped outright.
        """
        entry = (self.solution.exact_counts or {}).get(signature) if self.mode == "exact" else None
        if entry is None or not entry[2] or not 0 < entry[1] < entry[0]:
            return None
        return entry[0], entry[1]

    def fixed_copies(self, keep_probability: float, signature: str | None = None):
        """1 or 0 when a row's copies need no draw (its signature kept whole or not at all, q of 1
        or 0, weights mode), else None: the row's keyed draw decides (see copies)."""
        if self.mode == "weights":
            return int(keep_probability > 0)
        if self.mode == "repeat":
            raise ValueError(
                "repeat mode decides copies along the global order (see repeat_copies)")
        if self.mode == "exact" and signature is not None:
            entry = (self.solution.exact_counts or {}).get(signature)
            if entry is not None and entry[2]:
                if entry[1] >= entry[0]:
                    return 1
                if entry[1] <= 0:
                    return 0
                return None  # ranked: its threshold decides, whatever q's rounding says
        if keep_probability >= 1 or keep_probability <= 0:  # a draw in [0, 1) cannot change these
            return int(keep_probability >= 1)
        return None

    def copies(self, key: str, keep_probability: float, signature: str | None = None,
               threshold=None) -> int:
        """1 or 0 for one record (repeat mode needs the global order: see repeat_copies).

        exact: for a ranked signature, 1 iff (h(seed, key), key) is at most the signature's
        threshold (the k_s-th smallest); all rows of a signature with k_s = n_s, none with k_s = 0;
        otherwise as bernoulli. bernoulli: 1 iff h(seed, key) < q. weights: 1 iff q > 0.
        """
        fixed = self.fixed_copies(keep_probability, signature)
        if fixed is not None:
            return fixed
        draw = hashing.keyed_uniform(self.seed, key)
        if threshold is not None and self.exact_signature(signature) is not None:
            return int((draw, key) <= tuple(threshold))
        return int(hashing.keep_bernoulli(keep_probability, draw))

    def weight(self, keep_probability: float) -> float:
        """Training weight of a kept record: q / eta in weights mode (unbiased for the plan), else
        1."""
        if self.mode == "weights":
            return keep_probability / self.solution.keep_rate
        return 1.0


def repeat_mass(keep_probability: float) -> int:
    return int(round(keep_probability * REPEAT_MASS_UNITS))


def repeat_copies(start: int, end: int, total: int, output_size: int, offset_uniform: float) -> int:
    """Systematic sampling in integers: copies of the record owning [start, end) of `total` mass.

    With u = floor(U * total) < total the copies add up to exactly `output_size`:
    sum_i floor((u + T end_i) / S) - floor((u + T start_i) / S) = floor((u + T S) / S) = T.
    """
    if total <= 0:
        return 0
    shift = int(offset_uniform * total)
    return (shift + output_size * end) // total - (shift + output_size * start) // total


def copy_key(key: str, copy: int) -> str:
    """Key of the copy-th copy of a record: the record's own key first, then key_copyN."""
    return key if copy == 0 else f"{key}_copy{copy}"


def order_uniform(seed: int, key: str, copy: int = 0) -> float:
    """Where a (record, copy) goes in the release: a keyed hash independent of the keep draw."""
    return hashing.keyed_uniform(seed, key if copy == 0 else f"{key}\x00{copy}", hashing.ORDER)


def release_members(sample: dict, balance: dict) -> list[tuple[str, bytes]]:
    """(extension, bytes) of a released sample: members as they were, json gaining `balance`.

    Caption-table rows have no members: they become text-only samples (txt + json).
    """
    members = dict(sample.get("members") or {})
    if not members:
        caption = sample.get("caption")
        if caption is not None:
            members["txt"] = caption.encode("utf-8")
    json_name = next((name for name in members if name.lower() == "json"), None)
    meta = dict(sample.get("meta") or {})
    if json_name is None:
        json_name = "json"
        meta.setdefault("key", sample.get("key"))
    meta["balance"] = balance
    members[json_name] = encode_json(meta)
    return list(members.items())


# json.dumps(value, ensure_ascii=False, default=str) builds this encoder on every call
_JSON_ENCODER = json.JSONEncoder(ensure_ascii=False, default=str)


def encode_json(value) -> bytes:
    """A released sample's json member: json.dumps(value, ensure_ascii=False, default=str) as
    UTF-8."""
    return _JSON_ENCODER.encode(value).encode("utf-8")


def solution_digest(solution: BalanceSolution) -> str:
    """sha256 of what decides q (spec, rate, duals, tilt), not of timings: equal digests, equal
    releases."""
    payload = json.loads(solution.to_json())
    decisive = {
        name: payload[name]
        for name in ("spec", "keep_rate", "constraint_duals", "rate_dual", "utility_tilt",
                     "utility_mean")
    }
    return hashlib.sha256(json.dumps(decisive, sort_keys=True).encode("utf-8")).hexdigest()


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with FileSystems.open(path) as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
