"""The `balancebeam` command: one entry point, one subcommand per job.

Subcommands are imported lazily, so `balancebeam train` never imports Beam and `--help` is fast.
"""
import atexit
import importlib
import logging
import os
import sys
import threading

from pipeline.errors import EXIT_DATA, EXIT_OK, EXIT_USAGE, DataError, UsageError

GLOBAL_FLAGS = ("--debug", "--quiet", "--progress")

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"
# Our own packages say what they do at INFO; everything else (Beam, open_clip, ...) from WARNING up.
INFO_LOGGERS = ("pipeline", "solvers", "trainer")


def configure_logging(quiet: bool = False) -> None:
    """Before any command module is imported, so that logging is ours before a library's import
    logs."""
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT)
    for name in INFO_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING if quiet else logging.INFO)

# name -> ("module:function", one-line help). Each function takes argv (list of str) and returns
# an exit code or None.
COMMANDS = {
    "demo": ("pipeline.demo:run", "run the whole job end to end on data it makes itself"),
    "annotate": ("pipeline.annotate:run", "annotate image-text pairs (Beam job)"),
    "embed-prompts": ("pipeline.embed_prompts:run",
                      "embed the zero-shot prompts once, for pools with image embeddings"),
    "balance": ("pipeline.balance:run", "solve M4 on annotations, write solution.json (Beam job)"),
    "resample": ("pipeline.resample:run",
                 "write balanced WebDataset shards or a subset file (Beam job)"),
    "report": ("pipeline.report:run", "statistics before/after, plots and dataset card"),
    "run": ("pipeline.run_all:run", "annotate, balance, resample and report in one go"),
    "synth": ("trainer.synth:main", "write planted-bias synthetic WebDataset shards"),
    "train": ("trainer.train:main", "train a contrastive model on WebDataset shards"),
    "evaluate": ("trainer.evaluate:main", "measure a model's bias (RB, AB) and quality"),
    "study": ("pipeline.study.runner:run",
              "run the balancing study (variants x seeds x schedules)"),
}


def _usage() -> str:
    lines = ["usage: balancebeam COMMAND [ARGS...]", "", "commands:"]
    width = max(len(name) for name in COMMANDS)
    for name, (_, help_text) in COMMANDS.items():
        lines.append(f"  {name.ljust(width)}  {help_text}")
    lines.append("")
    lines.append("Run `balancebeam COMMAND --help` for a command's flags.")
    lines.append("")
    lines.append("flags for every command (before or after it):")
    lines.append("  --debug     show a failure's traceback")
    lines.append("  --quiet     only warnings and errors, no progress")
    lines.append(
        "  --progress  progress lines and bars even when the output is not a terminal (a log file)")
    lines.append("")
    lines.append("Exit codes: 0 ok, 1 a data, solver or reconciliation problem, 2 a usage problem.")
    return "\n".join(lines)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("balancebeam")
    except PackageNotFoundError:
        return "unknown (not installed)"


def main(argv=None) -> int:
    """Run one command; failures print one line (the traceback only with --debug).

    Exit codes: 0 ok, 1 a data, solver or reconciliation problem, 2 a usage problem.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug, quiet, progress = ("--debug" in argv), ("--quiet" in argv), ("--progress" in argv)
    if quiet and progress:
        print("balancebeam: --quiet and --progress contradict each other; pass one",
              file=sys.stderr)
        return EXIT_USAGE
    argv = [a for a in argv if a not in GLOBAL_FLAGS]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return EXIT_OK
    if argv[0] == "--version":
        print(f"balancebeam {_version()}")
        return EXIT_OK
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"balancebeam: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(quiet)
    target, _ = COMMANDS[name]
    from solvers import progress as progress_policy  # noqa: PLC0415  (numpy: not for --help)

    saved = os.environ.get(progress_policy.ENV)
    if quiet or progress:  # solvers.progress reads it: every bar and progress line of the command
        os.environ[progress_policy.ENV] = "1" if progress else "0"
    module_name, function_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
        result = getattr(module, function_name)(rest)
    except UsageError as error:
        if debug:
            raise
        print(f"balancebeam {name}: {_one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    except (DataError, ValueError, FileNotFoundError) as error:
        if debug:
            raise
        print(f"balancebeam {name}: {_one_line(error)}", file=sys.stderr)
        return EXIT_DATA
    finally:
        if saved is None:
            os.environ.pop(progress_policy.ENV, None)
        else:
            os.environ[progress_policy.ENV] = saved
    return int(result or 0)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return (
        text.removeprefix("balancebeam ").split(": ", 1)[-1]
        if text.startswith("balancebeam ")
        else text
    )


def console_main() -> None:
    """The `balancebeam` command (and `python -m pipeline.cli`): main(), then exit at once.

    With Beam, pyarrow, scipy and matplotlib loaded, Python's own teardown (clearing 2,000-odd
    modules) takes 0.5-0.9 s after the work is done, on every command. Every file a command writes
    is closed before main() returns; exit handlers run and stdio is flushed first. While a thread
    that is not a daemon still runs, or a profiler or tracer watches, it exits the usual way.
    """
    code = main()
    others = [thread for thread in threading.enumerate()
              if thread is not threading.main_thread() and not thread.daemon and thread.is_alive()]
    if others or sys.getprofile() is not None or sys.gettrace() is not None:
        sys.exit(code)  # a thread to wait for; a profiler, coverage or debugger that reports last
    atexit._run_exitfuncs()  # what registered to run at exit still runs (logging's flush too)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`balancebeam ... | head`) or stream
            pass
    os._exit(code)


if __name__ == "__main__":
    console_main()
