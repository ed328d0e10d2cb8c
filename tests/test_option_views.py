"""pipeline/option_views.py: a remembered PipelineOptions view behaves as Beam's fresh one."""
from __future__ import annotations

import importlib

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import (DebugOptions, DirectOptions, GoogleCloudOptions,
                                                  PipelineOptions, SetupOptions, StandardOptions,
                                                  TypeOptions, WorkerOptions)

import pipeline.options  # noqa: F401  (installs the remembered views, as every job does)
from pipeline import option_views

FLAGS = ["--direct_running_mode=multi_processing", "--direct_num_workers=2",
         "--experiments=one", "--experiments=two", "--type_check_strictness=DEFAULT_TO_ANY",
         "--project=p", "--max_num_workers=3"]
# Beam's own, as the module found it
FRESH = option_views._beam_view_as
CLASSES = (StandardOptions, TypeOptions, DebugOptions, DirectOptions, GoogleCloudOptions,
           SetupOptions, WorkerOptions)


def values(view) -> dict:
    return {name: getattr(view, name) for name in view._visible_option_list()}


@pytest.fixture
def beam_calls(monkeypatch):
    """How often Beam's own view_as ran."""
    calls = []

    def counted(self, cls):
        calls.append(cls)
        return beam_view_as(self, cls)

    beam_view_as = option_views._beam_view_as
    monkeypatch.setattr(option_views, "_beam_view_as", counted)
    return calls


def test_every_job_gets_the_remembered_views():
    # by name: the reload test below makes the module's function a new object
    installed = PipelineOptions.view_as
    assert (installed.__module__, installed.__name__) == (option_views.__name__, "view_as")


def test_loading_the_module_again_keeps_beams_own_view_as(monkeypatch):
    again = importlib.reload(option_views)
    monkeypatch.setattr(PipelineOptions, "view_as", again.view_as)
    assert again._beam_view_as is FRESH
    assert PipelineOptions(FLAGS).view_as(WorkerOptions).max_num_workers == 3


@pytest.mark.parametrize("cls", CLASSES)
def test_a_remembered_view_reads_what_a_fresh_one_reads(cls):
    options = PipelineOptions(FLAGS)
    first = options.view_as(cls)
    again = options.view_as(cls)
    assert again is first
    assert values(again) == values(FRESH(options, cls))
    assert values(again) == values(FRESH(PipelineOptions(FLAGS), cls))


def test_writes_through_any_view_are_seen_by_every_view(beam_calls):
    options = PipelineOptions(FLAGS)
    options.view_as(StandardOptions).streaming = True
    assert options.view_as(StandardOptions).streaming is True
    assert FRESH(options, StandardOptions).streaming is True
    # a list option stays one list across views, as with Beam's views
    options.view_as(DebugOptions).add_experiment("three")
    assert options.view_as(DebugOptions).experiments == ["one", "two", "three"]
    assert options.get_all_options()["experiments"] == ["one", "two", "three"]
    assert beam_calls.count(StandardOptions) == 1 and beam_calls.count(DebugOptions) == 1


def test_other_options_flags_or_dict_make_a_new_view(beam_calls):
    options, other = PipelineOptions(FLAGS), PipelineOptions(["--max_num_workers=9"])
    assert options.view_as(WorkerOptions).max_num_workers == 3
    assert other.view_as(WorkerOptions).max_num_workers == 9
    options.view_as(WorkerOptions)
    assert len(beam_calls) == 2
    options._flags.append("--num_workers=4")  # flags changed in place: Beam is asked again
    assert values(options.view_as(WorkerOptions)) == values(FRESH(options, WorkerOptions))
    assert len(beam_calls) == 3
    options._all_options = dict(options._all_options, max_num_workers=5)  # a new dict
    assert options.view_as(WorkerOptions).max_num_workers == 5
    assert len(beam_calls) == 4


def test_a_graph_build_asks_beam_for_few_views(beam_calls):
    with_views = beam.Pipeline(options=PipelineOptions(FLAGS))
    pcoll = with_views | beam.Create([1, 2, 3])
    for step in range(20):
        pcoll = pcoll | f"Step{step}" >> beam.Map(lambda x: x + 1)
    # Beam asks for a view several times per transform; each class is made once per options
    assert len(beam_calls) <= 2 * len(CLASSES) + 10
