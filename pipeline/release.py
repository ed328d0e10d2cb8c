"""What resample decides and writes, as pure functions: keep probability, copies, samples, tar shards.

No Beam here: the resample job calls these per record, and tests call them directly.
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
import uuid

import numpy as np
from apache_beam.io.filesystems import FileSystems

from pipeline import hashing
from pipeline.signatures import encode, row_signature
from solvers.solution import BalanceSolution

MODES = ("bernoulli", "weights", "repeat")
DEFAULT_MODE = "bernoulli"
DEFAULT_SEED = 0
DEFAULT_PREFIX = "balanced"
# img2dataset writes 10,000 samples per shard; 1,000 keeps a shard of web images (~100 kB each)
# near 100 MB, which one worker holds in memory while writing it.
DEFAULT_SAMPLES_PER_SHARD = 1000
# Repeat mode does systematic sampling in integers: q is scaled to this many units, so running
# sums are exact and the output size is exactly the one asked for.
REPEAT_MASS_UNITS = 1 << 32
SHARD_DIGITS = 5
# Deterministic tar headers: the same samples give the same bytes on every run and worker.
_TAR_MTIME = 0
_TAR_MODE = 0o444


class KeepRule:
    """Keep probability and copies of a record from its features, the solution and the seed.

    A pure function of (features, solution, seed), memoised by signature: rows with the same
    signature have the same q, so a worker computes q once per signature it meets.
    """

    def __init__(self, solution: BalanceSolution, seed: int = DEFAULT_SEED, mode: str = DEFAULT_MODE):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.solution = solution
        self.seed = int(seed)
        self.mode = mode
        self.attribute_names = list(solution.spec.attribute_names)
        self.concept_names = list(solution.spec.concept_names)
        self._known_attributes = set(self.attribute_names)
        self._known_concepts = set(self.concept_names)
        self._memo: dict[str, float] = {}

    def signature(self, attributes, concepts, utility=None) -> str:
        """Signature over the solution's own columns (unknown labels do not change q)."""
        attributes = [a for a in attributes or () if a in self._known_attributes]
        concepts = [c for c in concepts or () if c in self._known_concepts]
        return row_signature(attributes, concepts, utility, conditional=self.solution.spec.conditional,
                             use_utility=bool(self.solution.utility_tilt))

    def keep_probability(self, attributes, concepts, utility=None) -> float:
        text = self.signature(attributes, concepts, utility)
        if text not in self._memo:
            attributes_row = encode([attributes or ()], self.attribute_names)
            concepts_row = encode([concepts or ()], self.concept_names)
            utilities = None
            if self.solution.utility_tilt:
                utilities = np.array([self.solution.utility_mean if utility is None else float(utility)])
            self._memo[text] = float(self.solution.q_for(attributes_row, concepts_row, utilities)[0])
        return self._memo[text]

    def copies(self, key: str, keep_probability: float) -> int:
        """Bernoulli: 1 iff h(seed, key) < q; weights: 1 iff q > 0 (repeat needs the global order)."""
        if self.mode == "weights":
            return int(keep_probability > 0)
        if self.mode == "bernoulli":
            return int(hashing.keep_bernoulli(keep_probability, hashing.keyed_uniform(self.seed, key)))
        raise ValueError("repeat mode decides copies along the global order (see repeat_copies)")

    def weight(self, keep_probability: float) -> float:
        """Training weight of a kept record: q / eta in weights mode (unbiased for the plan), else 1."""
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
    members[json_name] = json.dumps(meta, ensure_ascii=False, default=str).encode("utf-8")
    return list(members.items())


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:0{SHARD_DIGITS}d}.tar"


class _HashingWriter:
    """File wrapper that counts and hashes what tarfile writes through it."""

    def __init__(self, raw):
        self.raw, self.size, self.digest = raw, 0, hashlib.sha256()

    def write(self, data):
        self.raw.write(data)
        self.size += len(data)
        self.digest.update(data)
        return len(data)


def tar_bytes(samples) -> bytes:
    """A whole shard in memory (for tests and small shards)."""
    buffer = io.BytesIO()
    _write_tar(buffer, samples)
    return buffer.getvalue()


def _write_tar(raw, samples) -> None:
    with tarfile.open(fileobj=raw, mode="w|", format=tarfile.PAX_FORMAT) as archive:
        for key, members in samples:
            for extension, data in members:
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size, info.mtime, info.mode = len(data), _TAR_MTIME, _TAR_MODE
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                archive.addfile(info, io.BytesIO(data))


def write_shard(path: str, samples) -> dict:
    """Write [(key, [(ext, bytes)])] as one tar: a temporary name, then renamed into place.

    A crash leaves at worst a *.tmp-* file, never a half shard under the final name.
    Returns {"name", "samples", "bytes", "sha256"} of the shard as written.
    """
    samples = list(samples)
    temporary = f"{path}.tmp-{uuid.uuid4().hex}"
    with FileSystems.create(temporary) as raw:
        writer = _HashingWriter(raw)
        _write_tar(writer, samples)
    if FileSystems.exists(path):
        FileSystems.delete([path])
    FileSystems.rename([temporary], [path])
    return {"name": path.rsplit("/", 1)[-1], "samples": len(samples), "bytes": writer.size,
            "sha256": writer.digest.hexdigest()}


def solution_digest(solution: BalanceSolution) -> str:
    """sha256 of what decides q (spec, rate, duals, tilt), not of timings: equal digests, equal releases."""
    payload = json.loads(solution.to_json())
    decisive = {name: payload[name] for name in ("spec", "keep_rate", "constraint_duals", "rate_dual",
                                                  "utility_tilt", "utility_mean")}
    return hashlib.sha256(json.dumps(decisive, sort_keys=True).encode("utf-8")).hexdigest()


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with FileSystems.open(path) as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
