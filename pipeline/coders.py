"""The coder of the jobs' batch elements: encodes as Beam's default does, but measures cheaply.

Beam samples the size of what every step outputs (always an operation's first 10 elements, then
about 10 more per doubling) and gets a size by encoding the element with its PCollection's coder.
balancebeam's elements are batches (a list of thousands of samples, an Arrow table, a dict of
columns), a few dozen per worker, so nearly every one was encoded once only to be measured: in the
annotate job, a third of its per-record instructions beyond a plain loop's (callgrind, 60k minus
20k caption rows). A step whose output is typed `Batch` (or a KV with a `Batch` value) gets
BatchCoder: the same bytes as FastPrimitivesCoder when an element does cross the runner, and a size
estimated from lengths (an Arrow table's buffers, a few items of a long list) when it is sampled.
"""
from __future__ import annotations

import apache_beam as beam
from apache_beam.coders.coders import FastPrimitivesCoder

# Items of a long list or dict that stand for the rest in a size estimate, and how deep it looks.
_SAMPLED_ITEMS = 4
_MAX_DEPTH = 4


class _HoldsAnything(type):
    def __instancecheck__(cls, instance) -> bool:
        return True


class Batch(metaclass=_HoldsAnything):
    """Type hint of a step's batch output (never instantiated): what selects BatchCoder.

    Every value is an instance, so Beam's --runtime_type_check passes whatever form a batch takes
    (a list, a table, a dict); the hint chooses a coder, it does not constrain the elements.
    """


def estimated_size(value, depth: int = 0) -> int:
    """About how many bytes `value` takes encoded, from lengths, without encoding it."""
    if isinstance(value, (bytes, str)):
        return len(value)
    nbytes = getattr(value, "nbytes", None)  # Arrow tables and arrays, NumPy arrays
    if isinstance(nbytes, int):
        return nbytes
    if depth >= _MAX_DEPTH:
        return 8
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        if not value:
            return 1
        items = value[:_SAMPLED_ITEMS]
        measured = sum(estimated_size(item, depth + 1) for item in items)
        return max(1, measured * len(value) // len(items))
    return 8


class BatchCoder(beam.coders.Coder):
    """FastPrimitivesCoder's encoding, estimated_size's measure (see the module's docstring)."""

    def __init__(self):
        self._coder = FastPrimitivesCoder()

    def encode(self, value):
        return self._coder.encode(value)

    def decode(self, encoded):
        return self._coder.decode(encoded)

    def estimate_size(self, value):
        return estimated_size(value)

    def is_deterministic(self) -> bool:
        return False

    def to_type_hint(self):
        return Batch

    def __eq__(self, other):
        return type(self) is type(other)

    def __hash__(self):
        return hash(type(self))


beam.coders.registry.register_coder(Batch, BatchCoder)
