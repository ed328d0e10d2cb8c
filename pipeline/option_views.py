"""Beam's `PipelineOptions.view_as`, made once per options object and class instead of per call.

Every `view_as` call builds a new argparse parser of the class's options and parses the flags again
(0.5-1 ms), and Beam calls it several times for each transform a graph applies (type inference and
type checks ask the pipeline's TypeOptions each time): one `balancebeam run` of two jobs made 1,263
views, 0.73 s of the driver's time while the workers waited. A view holds nothing of its own: its
values live in the options' shared dict (`_all_options`), which is what its attributes read and
write. So a view made once serves every later call for the same class on the same options, as long
as they keep the same flags and the same dict (checked on each call; otherwise Beam's own view_as
makes a new one). `install` is idempotent; tests/test_option_views.py holds the equivalence on the
pinned Beam.
"""
from __future__ import annotations

import weakref

from apache_beam.options.pipeline_options import PipelineOptions

# Beam's own, also when this module is loaded again (a reload must not wrap the wrapper)
_beam_view_as = getattr(PipelineOptions.view_as, "beam_view_as", PipelineOptions.view_as)
# options object -> {view class: (view, the flags it was parsed from)}
_views: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def view_as(self, cls):
    """Beam's view_as, the view remembered (same values, same shared dict)."""
    if self._flags is None:  # parsed from sys.argv, which may change: Beam's own
        return _beam_view_as(self, cls)
    flags = tuple(self._flags)
    try:
        views = _views[self]
    except TypeError:  # not weakly referenceable: Beam's own
        return _beam_view_as(self, cls)
    except KeyError:
        views = _views[self] = {}
    known = views.get(cls)
    if known is not None:
        view, known_flags = known
        if known_flags == flags and view._all_options is self._all_options:
            return view
    view = _beam_view_as(self, cls)
    views[cls] = (view, flags)
    return view


view_as.beam_view_as = _beam_view_as


def install() -> None:
    PipelineOptions.view_as = view_as
