"""`balancebeam run`: annotate, balance, resample and report into one output directory.

Flags of the four jobs go to the job that owns them; everything else goes to Beam (--runner ...).
"""
from __future__ import annotations

import argparse
import logging

from apache_beam.io.filesystems import FileSystems

from pipeline import annotate, balance, report, report_plots, resample, tars, warm_workers
from pipeline.errors import UsageError
from pipeline.files import ensure_writable_directory
from pipeline.options import check_pipeline_args
from pipeline.sources import FORMATS

log = logging.getLogger(__name__)

ANNOTATIONS_DIR = "annotations"
SOLUTION_FILE = "solution.json"
RELEASE_DIR = "release"


def layout(output: str) -> dict:
    """Where each job writes inside the output directory."""
    output = output.rstrip("/")
    return {"annotations": FileSystems.join(output, ANNOTATIONS_DIR),
            "solution": FileSystems.join(output, SOLUTION_FILE),
            "signatures": FileSystems.join(output, balance.SIGNATURES_FILE),
            "release": FileSystems.join(output, RELEASE_DIR)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="balancebeam run", description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=
        "annotate's own flags (--lexicon, --utility-field, --image-model, ...) are passed to it;\n"
        "flags no job knows go to Beam.\n\n"
        "examples:\n"
        "  balancebeam run --input 'shards/*.tar' --output out --keep-rate max --association-gap "
        "0.05 "
        "--direct_running_mode=multi_processing --direct_num_workers=2\n"
        "  balancebeam run --input 'pool/*.parquet' --output out --keep-rate max --output-format "
        "subset\n"
    )
    parser.add_argument("--input", required=True, action="append", help="input glob (repeatable)")
    parser.add_argument("--output", required=True,
                        help="output directory: annotations/, solution.json, release/")
    parser.add_argument("--input-format", choices=FORMATS, default="auto")
    balance.add_solve_arguments(parser)
    resample.add_release_arguments(parser)
    return parser


def split_annotate_args(rest):
    """Separate annotate's own flags from Beam's in the arguments `run` does not know."""
    annotate_parser = annotate.build_parser()
    known, beam_args = annotate_parser.parse_known_args(["--input", "-", "--output", "-", *rest])
    annotate_args = []
    for action in annotate_parser._actions:
        if not action.option_strings or action.dest in ("input", "output", "help", "input_format"):
            continue
        value = getattr(known, action.dest)
        if value is None or value == action.default:
            continue
        for item in value if isinstance(value, list) else [value]:
            annotate_args += [action.option_strings[0], str(item)]
    return annotate_args, beam_args


def run_all(inputs, output, args, annotate_args=(), beam_args=()) -> dict:
    """The four jobs in order; returns the release statistics."""
    paths = layout(output)
    annotate_argv = [a for pattern in inputs for a in ("--input", pattern)]
    annotate_argv += [
        "--output", paths["annotations"], "--input-format", args.input_format, *annotate_args
    ]
    # Every flag of every step is checked before the first job starts.
    annotate.check_arguments(annotate.build_parser().parse_args(annotate_argv))
    config = balance.config_from_args(args)
    resample.check_release_options(args.mode, args.samples_per_shard, args.output_size, args.seed)
    tars.check_prefix(args.prefix)
    check_pipeline_args(beam_args, "balancebeam run")
    try:
        ensure_writable_directory(output)
    except ValueError as error:
        raise UsageError(str(error)) from None
    # both local jobs' workers forked now (balance counts from annotate's label sets, no job)
    with warm_workers.pool(beam_args, jobs=2):
        log.info("1/4 annotate %s", ", ".join(inputs))
        annotate.run([*annotate_argv, *beam_args])
        log.info("2/4 balance")
        balance.balance(paths["annotations"], paths["solution"], config, beam_args,
                        paths["signatures"])
        log.info("3/4 resample")
        report_plots.import_in_background()  # the driver waits on resample's workers meanwhile
        resample.resample(inputs, paths["annotations"], paths["solution"], paths["release"],
                          seed=args.seed, mode=args.mode, samples_per_shard=args.samples_per_shard,
                          prefix=args.prefix, input_format=args.input_format,
                          output_size=args.output_size, pipeline_args=beam_args,
                          allow_approximate=args.allow_approximate,
                          output_format=args.output_format)
    log.info("4/4 report")
    return report.report(paths["solution"], paths["signatures"], paths["release"],
                         paths["annotations"])


def run(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args, rest = build_parser().parse_known_args(argv)
    annotate_args, beam_args = split_annotate_args(rest)
    run_all(args.input, args.output, args, annotate_args, beam_args)
    paths = layout(args.output)
    print(f"release: {paths['release']}  (report.html, README.md, manifest.json inside)")
    return 0
