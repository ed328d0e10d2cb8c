"""Keyed hashing: the uniform numbers that decide which examples a release keeps, and in what order.

A pure function of (seed, purpose, key): the same on one core or on thousands of workers
(DESIGN.md).
"""
import hashlib

from pipeline.errors import UsageError

# 53 bits: the mantissa of a float64, so every value maps to a distinct float in [0, 1).
_UNIFORM_BITS = 53
_UNIFORM_SCALE = float(1 << _UNIFORM_BITS)
# Purposes keep the keep/drop draw independent from the shard order: ordering kept records by
# the same number that decided to keep them would sort them by q.
KEEP = "keep"
ORDER = "order"
REPEAT = "repeat"
# The seed is written into the blake2b key ("SEED:PURPOSE", at most 64 bytes): 63 bits leave room
# for every purpose's name and keep the seed a plain non-negative integer in JSON and YAML.
SEED_BITS = 63


def check_seed(seed) -> int:
    """The seed as an int, or a UsageError when it is not a whole number in [0, 2**SEED_BITS)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << SEED_BITS:
        raise UsageError(
            f"--seed must be a whole number with 0 <= seed < 2**{SEED_BITS}, got {seed!r}")
    return seed


def keyed_uniform(seed: int, key: str, purpose: str = KEEP) -> float:
    """A uniform number in [0, 1) from blake2b keyed with (seed, purpose) over the example's key."""
    keyed = _KEYED.get((seed, purpose))
    if keyed is None:
        keyed = _keyed(seed, purpose)
    hashed = keyed.copy()  # the key block already hashed: half the time of a new keyed blake2b
    hashed.update(key.encode("utf-8"))
    return (int.from_bytes(hashed.digest(), "big") >> (64 - _UNIFORM_BITS)) / _UNIFORM_SCALE


# blake2b states that have hashed their (seed, purpose) key, per (seed, purpose)
_KEYED: dict = {}


def _keyed(seed, purpose):
    if len(_KEYED) > 64:
        _KEYED.clear()
    keyed = _KEYED[(seed, purpose)] = hashlib.blake2b(
        digest_size=8, key=f"{int(seed)}:{purpose}".encode("utf-8"))
    return keyed


def keep_bernoulli(keep_probability: float, draw: float) -> bool:
    """Keep iff h < q: P(keep) = q exactly when h is uniform, and q = 1 always keeps, q = 0 never.
    """
    return draw < keep_probability
