"""pipeline/dofn_specs.py: Beam's DoFn introspection worked out once per DoFn, same answers."""
from __future__ import annotations

import apache_beam as beam
import pytest
from apache_beam.coders import VarIntCoder
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms import userstate
from apache_beam.transforms.timeutil import TimeDomain

import pipeline.options  # noqa: F401  (installs it, as every job does)
from pipeline import dofn_specs

BEAM = dofn_specs.get_dofn_specs.beam_get_dofn_specs
BAG = userstate.BagStateSpec("seen", VarIntCoder())
TIMER = userstate.TimerSpec("flush", TimeDomain.WATERMARK)


class Plain(beam.DoFn):
    def process(self, element):
        yield element


class Stateful(beam.DoFn):
    def process(self, element, seen=beam.DoFn.StateParam(BAG), flush=beam.DoFn.TimerParam(TIMER)):
        seen.add(element[1])
        yield element

    @userstate.on_timer(TIMER)
    def on_flush(self):
        pass


class SumPerKey(beam.DoFn):
    """Keeps a running sum per key in state; emits it with each element."""
    TOTAL = userstate.ReadModifyWriteStateSpec("total", VarIntCoder())

    def process(self, element, total=beam.DoFn.StateParam(TOTAL)):
        total.write((total.read() or 0) + element[1])
        yield element[0], total.read()


class HoldsBoundMethod(beam.DoFn):
    """An instance attribute that is a bound method with a state parameter: what Beam inspects
    depends on the object, not only its class."""

    def __init__(self, method=None):
        super().__init__()
        if method is not None:
            self.extra = method

    def process(self, element):
        yield element


def test_installed_where_beam_looks_it_up():
    assert userstate.get_dofn_specs is dofn_specs.get_dofn_specs
    assert beam.transforms.core.userstate.get_dofn_specs is dofn_specs.get_dofn_specs


@pytest.mark.parametrize("make", [
    Plain, Stateful, SumPerKey, HoldsBoundMethod,
    lambda: HoldsBoundMethod(Stateful().process),
    lambda: beam.Map(len).fn,  # Beam's wrapper of a callable
])
def test_same_answers_as_beam(make):
    dofn = make()
    expected = BEAM(dofn)
    for _ in range(3):
        assert dofn_specs.get_dofn_specs(dofn) == expected
    assert userstate.is_stateful_dofn(dofn) == bool(expected[0] or expected[1])


def test_beams_own_runs_once_per_dofn(monkeypatch):
    calls = []

    def counted(dofn):
        calls.append(dofn)
        return BEAM(dofn)

    monkeypatch.setattr(dofn_specs, "_beam_get_dofn_specs", counted)
    first, second = Stateful(), Stateful()
    for _ in range(4):
        dofn_specs.get_dofn_specs(first)
        dofn_specs.get_dofn_specs(second)
    beam.ParDo(first)  # validation and "is it stateful?" ask again
    assert calls == [first, second]


def test_callers_get_sets_of_their_own():
    dofn = Stateful()
    state, timers = dofn_specs.get_dofn_specs(dofn)
    state.clear()
    timers.add("not a spec")
    assert dofn_specs.get_dofn_specs(dofn) == ({BAG}, {TIMER})


def test_a_new_dofn_at_a_collected_ones_address_gets_its_own_answer():
    # objects made and dropped in turn reuse addresses; each must still get its own specs
    seen_ids, entries_before = set(), len(dofn_specs._specs)
    for index in range(300):
        dofn = Stateful() if index % 2 else Plain()
        expected = ({BAG}, {TIMER}) if index % 2 else (set(), set())
        assert dofn_specs.get_dofn_specs(dofn) == expected
        seen_ids.add(id(dofn))
        del dofn  # no cycles: freed here, its weak reference's callback run
    assert len(seen_ids) < 300  # addresses were reused, so the check above meant something
    assert len(dofn_specs._specs) <= entries_before  # collected DoFns' entries are gone


def test_stateful_pipeline_still_keeps_its_state():
    elements = [("a", 1), ("b", 10), ("a", 2), ("a", 3), ("b", 20)]
    with beam.Pipeline() as p:
        sums = (p | beam.Create(elements) | beam.ParDo(SumPerKey()))
        # per key, the running sums end at the key's total whatever the order within it
        finals = sums | beam.CombinePerKey(max)
        assert_that(finals, equal_to([("a", 6), ("b", 30)]))
