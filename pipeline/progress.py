"""Progress of a local Beam job: "N of M input files read (R records)" while it runs.

A DirectRunner job blocks the driver until it is done, and Beam's metrics are read at the end, so
the driver cannot ask the workers how far they are. What the job can know is which input ranges are
finished: each reader leaves a small marker file per range it finished (in a temporary folder on
this machine), and a thread in the driver counts them against the files it matched and logs a line
when the count moved, at most every few seconds, and the count it ended with. A range read twice
(a retried bundle) writes the same marker again, so nothing is counted twice.

Only local runs report (the DirectRunner in any mode, or a portable runner with LOOPBACK workers):
elsewhere the workers cannot reach this machine's folder, and Dataflow, Flink and Spark have
their own job pages. Shown when solvers.progress says so (a terminal, unless --quiet).
"""
from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time

from apache_beam.options.pipeline_options import PortableOptions, StandardOptions

from pipeline.files import write_json_atomically
from pipeline.options import LOCAL_RUNNERS
from solvers import progress as progress_policy

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0
LOG_EVERY_SECONDS = 5.0


def mark_range_read(marker_dir: str | None, file_range: dict, records: int) -> None:
    """Worker side: record that `file_range` was read whole (no-op without a marker folder)."""
    if not marker_dir:
        return
    digest = hashlib.sha1(file_range["path"].encode()).hexdigest()[:16]
    name = f"{digest}-{file_range['index']}-of-{file_range.get('ranges_in_file', 1)}.json"
    # atomically: the driver never reads half a marker
    write_json_atomically(os.path.join(marker_dir, name),
                          {"path": file_range["path"], "records": records})


def is_local(options) -> bool:
    """Whether the job's workers share this machine's file system."""
    runner = options.view_as(StandardOptions).runner
    if runner in LOCAL_RUNNERS:
        return True
    return str(options.view_as(PortableOptions).environment_type or "").upper() == "LOOPBACK"


class InputProgress:
    """Context manager around a job's run: logs files read against files matched while it runs.

    `marker_dir` is None when progress is off; hand it to the readers either way.
    """

    def __init__(self, job: str, input_files: int, options, show: bool | None = None):
        """input_files: how many files the job's globs matched (the job has matched them already).
        """
        self.job, self._total_files = job, input_files
        self.active = input_files > 0 and progress_policy.enabled(show) and is_local(options)
        self.marker_dir = None
        self._stop = threading.Event()
        self._thread = None
        self._last_logged = None
        # marker file name -> (file digest, ranges in the file, records): read once
        self._markers = {}

    def __enter__(self):
        if not self.active:
            return self
        self.marker_dir = tempfile.mkdtemp(prefix=f"balancebeam-{self.job}-progress-")
        self._thread = threading.Thread(target=self._watch, name=f"{self.job}-progress",
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type, *exc_info):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            final = self.state()
            # the count the job ended with, once
            if exc_type is None and final != self._last_logged:
                self._log(final)
        if self.marker_dir:
            shutil.rmtree(self.marker_dir, ignore_errors=True)
        return False

    def state(self) -> tuple[int, int, int]:
        """(files read whole, files matched, records read) from the markers present now.

        A marker never changes once written (a retried range writes the same one again), so each
        is read once; a poll only lists the folder and reads the new ones."""
        for name in os.listdir(self.marker_dir):
            if not name.endswith(".json") or name in self._markers:
                continue
            digest, _, rest = name[:-len(".json")].partition("-")
            _, _, of = rest.partition("-of-")
            try:
                with open(os.path.join(self.marker_dir, name)) as handle:
                    self._markers[name] = (digest, int(of or 1), int(json.load(handle)["records"]))
            except (OSError, ValueError, KeyError):
                continue
        ranges_done, ranges_of = collections.Counter(), {}
        for digest, of, _ in self._markers.values():
            ranges_done[digest] += 1
            ranges_of[digest] = of
        files_done = sum(1 for digest, done in ranges_done.items() if done >= ranges_of[digest])
        return files_done, self._total_files, sum(records
                                                  for _, _, records in self._markers.values())

    def _watch(self) -> None:
        logged_at = time.monotonic()
        while not self._stop.wait(POLL_SECONDS):
            state = self.state()
            if state != self._last_logged and time.monotonic() - logged_at >= LOG_EVERY_SECONDS:
                self._log(state)
                logged_at = time.monotonic()

    def _log(self, state) -> None:
        self._last_logged = state
        files_done, files, records = state
        percent = f" ({100 * files_done / files:.0f}%)" if files else ""
        log.info("%s: %d of %d input files read%s, %s records so far", self.job, files_done, files,
                 percent, f"{records:,}")
