"""PipelineOptions for balancebeam's Beam jobs: the user's flags checked, worker logs quieter
locally.

Beam keeps flags it does not know and only logs "Discarding unparseable args"; a mistyped flag or an
unquoted glob (`--input data/*.tar` expands to extra words) would then be silently ignored, so every
job refuses arguments that neither it nor any Beam option class knows. On the DirectRunner in
multi-process mode every SDK worker logs its start-up and each bundle at INFO to the terminal
(over a hundred lines for a small job), burying the job's own summary, and two known-harmless
warnings per worker, each echoed a second time by the job service:
- "Discarding unparseable args: ['--pipeline_type_check', '--direct_runner_use_stacked_bundle']":
  the worker rebuilds its options from a dictionary in which these two defaults are True, and
  True becomes a flag that does not exist (the user's own flags were already checked here);
- "No semi_persistent_directory found": a local worker has no staging directory, by design.
Both are silenced in the workers only, by raising those two loggers to ERROR through Beam's
`--sdk_harness_log_level_overrides`; errors still show, and the driver's logging is untouched.

Local jobs (no `--runner`, or `--runner DirectRunner`) run on `LocalRunner`: the DirectRunner's
FnApiRunner, without the DirectRunner's first try on Prism (below).
"""
from __future__ import annotations

import functools
import json
import logging
import os

from apache_beam.options.pipeline_options import (DirectOptions, PipelineOptions, StandardOptions,
                                                  _BeamArgumentParser)
from apache_beam.runners.direct.direct_runner import DirectRunner
from apache_beam.runners.portability.fn_api_runner import fn_runner

from pipeline import dofn_specs, option_views, warm_workers
from pipeline.errors import UsageError

option_views.install()
dofn_specs.install()

WORKER_LOG_FLAG = "--default_sdk_harness_log_level"
# Local runs only: on Dataflow, Flink or Spark the workers' INFO logs go to the service's log
# viewer, where they help, so Beam's default stays. Pass the flag to choose another level.
LOCAL_WORKER_LOG_LEVEL = "WARNING"
# Local workers send their log records to the runner, which logs them again on this logger.
LOCAL_WORKER_LOG_RELAY = "apache_beam.runners.portability.local_job_service"
WORKER_OVERRIDES_FLAG = "--sdk_harness_log_level_overrides"
# The worker module runs as __main__ (`python -m apache_beam.runners.worker.sdk_worker_main`), or
# under its own name in a warm worker (pipeline/warm_workers.py).
LOCAL_WORKER_LOG_OVERRIDES = {"apache_beam.options.pipeline_options": "ERROR", "__main__": "ERROR",
                              "apache_beam.runners.worker.sdk_worker_main": "ERROR"}
LOCAL_RUNNER = "pipeline.options.LocalRunner"
LOCAL_RUNNERS = (None, "DirectRunner", "direct", "BundleBasedDirectRunner", "SwitchingDirectRunner",
                 LOCAL_RUNNER)
# The runner names pipeline_options hands to LocalRunner.
TO_LOCAL_RUNNER = (None, "DirectRunner", "direct")


class LocalRunner(DirectRunner):
    """Beam's DirectRunner as balancebeam tests it: the FnApiRunner (in one process, or with
    `--direct_running_mode=multi_processing` in several), never Prism.

    Since Beam 2.6x the DirectRunner first hands any pipeline Prism supports to the Prism runner,
    downloading its binary from GitHub on a machine with internet, and falls back to the FnApiRunner
    when that fails (as it does offline). The local promises (reconciled counts, byte-identical
    releases whatever the workers, the workarounds in docs/beam-data-loss.md, each worker's thread
    share) are tested on the FnApiRunner, so a local job runs there, online or not, with the same
    provision info the DirectRunner gives it. `--runner PrismRunner` chooses Prism explicitly.
    In multi-process mode the workers come from the command's warm pool when it started one
    (pipeline/warm_workers.py).
    """

    def is_fnapi_compatible(self):
        # It always runs the FnApiRunner: Pipeline.run then skips the runner-API round trip it makes
        # for other runners (a second serialisation and unpickling of every DoFn, 0.3-0.6 s a job).
        return True

    def run_pipeline(self, pipeline, options):
        from apache_beam.portability.api import beam_provision_api_pb2
        from apache_beam.runners.portability.portable_runner import JobServiceHandle

        encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
        provision = fn_runner.ExtendedProvisionInfo(
            beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded))
        return _FnApiRunner(provision_info=provision).run_pipeline(pipeline, options)


class _FnApiRunner(fn_runner.FnApiRunner):
    """Beam's FnApiRunner, its multi-process workers served by the warm pool when there is one."""

    def run_via_runner_api(self, pipeline_proto, options):
        warm_workers.use_pool(pipeline_proto)
        return super().run_via_runner_api(pipeline_proto, options)


@functools.lru_cache(maxsize=1)
def _beam_parser() -> _BeamArgumentParser:
    """An argparse parser that knows every flag of every PipelineOptions class imported so far."""
    parser = _BeamArgumentParser(allow_abbrev=False)
    seen, pending = set(), list(PipelineOptions.__subclasses__())
    while pending:
        options_class = pending.pop()
        if options_class in seen:
            continue
        seen.add(options_class)
        pending.extend(options_class.__subclasses__())
        options_class._add_argparse_args(parser)  # pylint: disable=protected-access
    return parser


def unknown_arguments(beam_args) -> list[str]:
    """The arguments no Beam option class knows (what Beam would discard with a log line)."""
    _, unknown = _beam_parser().parse_known_args(list(beam_args))
    return unknown


def check_pipeline_args(beam_args, command: str = "balancebeam") -> None:
    """Raise UsageError naming the arguments nobody recognises, with the likely cause."""
    unknown = unknown_arguments(beam_args)
    if not unknown:
        return
    words = [a for a in unknown if not a.startswith("-")]
    hint = ""
    if words:
        hint = (
            " (words without a flag: an unquoted glob such as --input data/*.tar is expanded by "
            "the shell and only its first file would be read; quote it: --input 'data/*.tar')")
    raise UsageError(
        f"{command}: unrecognised arguments: {' '.join(unknown)}{hint}; see {command} --help")


def pipeline_options(beam_args, command: str = "balancebeam") -> PipelineOptions:
    """PipelineOptions from the job's leftover argv (checked); adds the quiet worker log level
    locally."""
    args = list(beam_args)
    check_pipeline_args(args, command)
    given = PipelineOptions(args)
    runner = given.view_as(StandardOptions).runner
    if runner in TO_LOCAL_RUNNER:
        args = _without_flag(args, "--runner") + [f"--runner={LOCAL_RUNNER}"]
    if runner in LOCAL_RUNNERS:
        if not _given(args, WORKER_LOG_FLAG):
            args.append(f"{WORKER_LOG_FLAG}={LOCAL_WORKER_LOG_LEVEL}")
        else:  # the user asked for the workers' logs: let the driver's relay of them through
            level = logging.getLevelName(
                str(given.get_all_options()["default_sdk_harness_log_level"]).upper())
            if isinstance(level, int):
                logging.getLogger(LOCAL_WORKER_LOG_RELAY).setLevel(level)
        if not _given(args, WORKER_OVERRIDES_FLAG):
            args.append(f"{WORKER_OVERRIDES_FLAG}={json.dumps(LOCAL_WORKER_LOG_OVERRIDES)}")
    return PipelineOptions(args)


def _without_flag(args, flag: str) -> list[str]:
    """args without `flag=value` or `flag value`."""
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == flag:
            skip = True
        elif not arg.startswith(flag + "="):
            kept.append(arg)
    return kept


def _given(args, flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def local_worker_threads(options: PipelineOptions) -> int | None:
    """Threads for each local worker's numeric libraries (BLAS, torch): the machine's cores shared
    among the DirectRunner's worker processes in multi_processing mode, None elsewhere (one process,
    or a cluster whose workers have their own cores).

    Each process's OpenBLAS otherwise starts a thread per core: two workers on two cores then run
    four threads that wait on each other, and a (32 x 768) @ (768 x 468) product took 19 times
    longer.
    """
    workers = local_worker_processes(options)
    return max(1, (os.cpu_count() or 1) // workers) if workers else None


def local_worker_processes(options: PipelineOptions, runners=LOCAL_RUNNERS) -> int:
    """The worker processes the DirectRunner starts for a job with these options, on one of
    `runners`: its multi_processing workers (`--direct_num_workers`, 0 or less: one per core), else
    0 (one process, or another runner)."""
    if options.view_as(StandardOptions).runner not in runners:
        return 0
    direct = options.view_as(DirectOptions)
    if direct.direct_running_mode != "multi_processing":
        return 0
    workers = direct.direct_num_workers
    return workers if workers > 0 else (os.cpu_count() or 1)
