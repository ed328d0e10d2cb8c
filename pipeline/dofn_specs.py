"""Beam's `userstate.get_dofn_specs`, worked out once per DoFn object instead of on every call.

It finds a DoFn's state and timer parameters by taking `inspect.signature` of every method the DoFn
has (about 30 for a plain DoFn), and Beam asks it several times for each ParDo: when the ParDo is
made (validation, "is it stateful?"), again in `to_runner_api`, again when a worker builds the
step. An annotate job (about 130 ParDos with Beam's own writers and combiners) made 390 calls and
12,000 signatures: 0.25-0.3 s of each job's start while the workers waited, half the time from
"annotating" to the first bundle (a 12,000-sample tar job: graph 0.25 -> 0.19 s, to_runner_api
0.26 -> 0.06 s), paid again by each job of `run`.

The answer depends only on the DoFn's methods and their defaults, which a DoFn does not change
once made, so it is kept per DoFn object (by identity, checked through a weak reference, dropped
when the object is collected); a DoFn that cannot be weakly referenced is inspected every time, as
before. Each caller gets sets of its own. Memoising Beam's introspection was proposed upstream
(apache/beam#9925) and not merged. `install` is idempotent; tests/test_dofn_specs.py holds the
equivalence on the pinned Beam.
"""
from __future__ import annotations

import weakref

from apache_beam.transforms import userstate

# Beam's own, also when this module is loaded again (a reload must not wrap the wrapper)
_beam_get_dofn_specs = getattr(userstate.get_dofn_specs, "beam_get_dofn_specs",
                               userstate.get_dofn_specs)
# id(dofn) -> (weak reference to it, its (state specs, timer specs)); the reference's callback
# drops the entry, and comparing it with the DoFn guards against a reused id
_specs: dict[int, tuple[weakref.ref, tuple[frozenset, frozenset]]] = {}


def _forget(key: int):
    return lambda _: _specs.pop(key, None)


def get_dofn_specs(dofn):
    """Beam's get_dofn_specs(dofn), worked out once per DoFn object."""
    key = id(dofn)
    known = _specs.get(key)
    if known is None or known[0]() is not dofn:
        state, timers = _beam_get_dofn_specs(dofn)
        try:
            reference = weakref.ref(dofn, _forget(key))
        except TypeError:  # not weakly referenceable: Beam's own answer, not kept
            return state, timers
        known = _specs[key] = reference, (frozenset(state), frozenset(timers))
    state, timers = known[1]
    return set(state), set(timers)


get_dofn_specs.beam_get_dofn_specs = _beam_get_dofn_specs


def install() -> None:
    # userstate's own is_stateful_dofn and validate_stateful_dofn look the name up in the module
    userstate.get_dofn_specs = get_dofn_specs
