"""PipelineOptions for balancebeam's Beam jobs: the user's flags as given, worker logs quieter locally.

On the DirectRunner in multi-process mode every SDK worker logs its start-up and each bundle at INFO
to the terminal (over a hundred lines for a small job), burying the job's own summary.
"""
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

WORKER_LOG_FLAG = "--default_sdk_harness_log_level"
# Local runs only: on Dataflow, Flink or Spark the workers' INFO logs go to the service's log
# viewer, where they help, so Beam's default stays. Pass the flag to choose another level.
LOCAL_WORKER_LOG_LEVEL = "WARNING"
LOCAL_RUNNERS = (None, "DirectRunner", "direct", "BundleBasedDirectRunner", "SwitchingDirectRunner")


def pipeline_options(beam_args) -> PipelineOptions:
    """PipelineOptions from the job's leftover argv; adds the quiet worker log level for local runs."""
    args = list(beam_args)
    runner = PipelineOptions(args).view_as(StandardOptions).runner
    if runner in LOCAL_RUNNERS and not any(a == WORKER_LOG_FLAG or a.startswith(WORKER_LOG_FLAG + "=")
                                           for a in args):
        args.append(f"{WORKER_LOG_FLAG}={LOCAL_WORKER_LOG_LEVEL}")
    return PipelineOptions(args)
