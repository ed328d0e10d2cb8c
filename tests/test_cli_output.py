"""What a user sees in the terminal: balancebeam's own lines and real problems only (no Beam worker
noise, in any runner mode), progress lines when asked for, and nothing but problems with --quiet."""
import logging
import os
import re
import subprocess
import sys
import tempfile

import pytest

from pipeline import annotate, progress
from solvers import progress as progress_policy

TWO_WORKERS = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]
# A line of ours: the CLI's log format with one of our packages as the logger.
OURS = re.compile(r"^(INFO|WARNING|ERROR|CRITICAL) (pipeline|solvers|trainer)(\.\w+)*: ")
# What Beam printed before, per worker or per job (the list).
KNOWN_NOISE = ("apitools not found", "semi_persistent_directory", "Discarding unparseable args",
               "local_job_service", "Logging handler created", "sdk_worker")
PROGRESS_LINE = re.compile(
    r"annotate: (\d+) of (\d+) input files read \(\d+%\), ([\d,]+) records so far")


def _environment(**extra):
    environment = {k: v for k, v in os.environ.items() if k != progress_policy.ENV}
    return {**environment, **extra}


def _balancebeam(*argv, **extra_env):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *argv], capture_output=True,
                          text=True, env=_environment(**extra_env), timeout=300)


@pytest.mark.parametrize("mode", ["in-process", "two workers", "portable"])
def test_a_job_prints_only_balancebeam_lines_in_every_runner_mode(mode, coco_mini_shards, tmp_path,
                                                                  request):
    runner_args = {"in-process": [], "two workers": TWO_WORKERS}.get(mode)
    if mode == "portable":
        port = request.getfixturevalue("job_service")
        runner_args = [
            "--runner=PortableRunner", f"--job_endpoint=localhost:{port}",
            "--environment_type=LOOPBACK"
        ]
    result = _balancebeam("annotate", "--input", coco_mini_shards.glob, "--output",
                          str(tmp_path / "out"), *runner_args)
    assert result.returncode == 0, result.stderr
    lines = (result.stdout + result.stderr).splitlines()
    assert any("annotate: read 159 records" in line for line in lines), lines
    assert [line for line in lines if not OURS.match(line)] == []
    assert [line for line in lines if any(noise in line for noise in KNOWN_NOISE)] == []
    # not a terminal, not asked: no progress
    assert not any(PROGRESS_LINE.search(line) for line in lines)


def test_quiet_leaves_only_problems_and_contradicting_flags_are_refused(coco_mini_shards, tmp_path):
    quiet = _balancebeam("--quiet", "annotate", "--input", coco_mini_shards.glob, "--output",
                         str(tmp_path / "out"), *TWO_WORKERS)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout == "" and quiet.stderr == ""
    assert (tmp_path / "out" / annotate.COUNTS_FILE).exists()
    both = _balancebeam("annotate", "--quiet", "--progress")
    assert both.returncode == 2 and both.stderr.count("\n") == 1 and "--quiet" in both.stderr


def test_progress_lines_count_finished_input_files_with_two_workers(coco_mini_shards, tmp_path,
                                                                    monkeypatch, caplog):
    """Workers (other processes) mark each range they finished; the driver's lines count whole files
    and their records, end at every file and record, and the marker folder goes with the job."""
    monkeypatch.setattr(progress, "LOG_EVERY_SECONDS", 0.0)
    monkeypatch.setattr(progress, "POLL_SECONDS", 0.05)
    monkeypatch.setenv(progress_policy.ENV, "1")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    caplog.set_level(logging.INFO, logger="pipeline.progress")
    annotate.run(
        ["--input", coco_mini_shards.glob, "--output", str(tmp_path / "out"), *TWO_WORKERS])
    seen = [
        PROGRESS_LINE.search(record.getMessage()) for record in caplog.records
        if record.name == progress.__name__
    ]
    assert seen and all(seen)
    states = [(int(m[1]), int(m[2]), int(m[3].replace(",", ""))) for m in seen]
    per_file = {}
    for record in coco_mini_shards.records:
        per_file[record["shard"]] = per_file.get(record["shard"], 0) + 1
    files = len(coco_mini_shards.paths)
    assert len(set(per_file.values())) == 1  # equal shards: records read = files read x shard size
    shard_size = per_file[str(coco_mini_shards.paths[0])]
    for done, total, records in states:
        assert total == files and records == done * shard_size
    assert [s[0] for s in states] == sorted(s[0] for s in states)
    assert states[-1] == (files, files, len(coco_mini_shards.records))
    # the markers went with the job
    assert [p for p in scratch.iterdir() if "progress" in p.name] == []


def test_progress_is_off_for_remote_runners_and_without_inputs(monkeypatch):
    from pipeline.options import pipeline_options

    monkeypatch.setenv(progress_policy.ENV, "1")
    assert progress.InputProgress("annotate", 3, pipeline_options([])).active
    # subset: nothing read
    assert not progress.InputProgress("resample", 0, pipeline_options([])).active
    dataflow = pipeline_options(["--runner=DataflowRunner"])
    assert not progress.InputProgress("annotate", 3, dataflow).active
    loopback = pipeline_options(["--runner=PortableRunner", "--environment_type=LOOPBACK"])
    assert progress.InputProgress("annotate", 3, loopback).active


def test_progress_policy_terminal_environment_and_flag(monkeypatch):
    monkeypatch.delenv(progress_policy.ENV, raising=False)
    monkeypatch.setattr(sys, "stderr", open(os.devnull, "w"))
    assert progress_policy.enabled() is False  # not a terminal
    monkeypatch.setenv(progress_policy.ENV, "1")
    assert progress_policy.enabled() is True and progress_policy.enabled(False) is False
    monkeypatch.setenv(progress_policy.ENV, "0")
    assert progress_policy.enabled() is False and progress_policy.enabled(True) is True
    assert progress_policy.bar(False, 10, "x") is None


def test_many_dropped_concepts_are_one_warning_not_a_line_each(caplog):
    """At web scale dozens of rare concepts show one value only; the plan drops each, and the
    terminal gets one line naming them (solution.json keeps every reason)."""
    from pipeline import plan

    def entries(n):
        return [{"concept": f"c{i}", "reason": f"'c{i}': all 5 annotated rows are 'man'"}
                for i in range(n)]

    caplog.set_level(logging.WARNING, logger="pipeline.balance")
    plan.log_dropped_concepts(entries(2))
    assert [r.getMessage() for r in caplog.records] == [
        "the plan drops a concept: 'c0': all 5 annotated rows are 'man'",
        "the plan drops a concept: 'c1': all 5 annotated rows are 'man'"]
    caplog.clear()
    plan.log_dropped_concepts(entries(12))
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("the plan drops 12 concepts ('c0', 'c1',") and "'c9' and 2 more)" in line
    assert "'c10'" not in line


def test_local_workers_share_the_cores_for_their_numeric_threads(monkeypatch):
    """Two local worker processes on two cores get one BLAS thread each; one process, or a cluster's
    workers, keep their libraries' defaults."""
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipeline.options import local_worker_threads

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    threads = lambda *flags: local_worker_threads(PipelineOptions(list(flags)))  # noqa: E731
    assert threads("--direct_running_mode=multi_processing", "--direct_num_workers=2") == 4
    assert threads("--direct_running_mode=multi_processing", "--direct_num_workers=16") == 1
    assert threads("--direct_running_mode=multi_processing", "--direct_num_workers=0") == 1
    assert threads("--direct_running_mode=in_memory") is None
    assert threads("--runner=DataflowRunner", "--direct_running_mode=multi_processing") is None


@pytest.mark.parametrize("flags", [[], ["--runner=DirectRunner"], ["--runner", "DirectRunner"]])
def test_local_jobs_run_on_the_fnapi_runner_never_prism(monkeypatch, tmp_path, flags):
    """Beam's DirectRunner first tries Prism (downloading it from GitHub where it can); local jobs
    run on the FnApiRunner the promises are tested on, whether or not Prism could start."""
    import tempfile

    import apache_beam as beam
    from apache_beam.options.pipeline_options import StandardOptions
    from apache_beam.runners.portability import prism_runner

    from pipeline.options import LOCAL_RUNNER, pipeline_options

    tried = []

    def prism_run(self, pipeline, options):
        tried.append(True)
        raise RuntimeError("no Prism here")  # the DirectRunner then falls back

    monkeypatch.setattr(prism_runner.PrismRunner, "run_pipeline", prism_run)
    options = pipeline_options([*flags, "--direct_running_mode=in_memory"])
    assert options.view_as(StandardOptions).runner == LOCAL_RUNNER
    with beam.Pipeline(options=options) as pipeline:
        _ = pipeline | beam.Create([1, 2]) | beam.Map(lambda x: x)
    assert tried == []
    # Beam's own DirectRunner: tries Prism first (whose job server leaves an empty temp folder)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with beam.Pipeline() as pipeline:
        _ = pipeline | beam.Create([1, 2]) | beam.Map(lambda x: x)
    assert tried == [True]


def test_the_command_exits_at_once_with_its_code_and_all_its_output():
    """console_main skips the interpreter's teardown (os._exit): what was printed still arrives
    through a pipe, and the exit code is main()'s."""
    done = _balancebeam("--version")
    assert done.returncode == 0 and done.stdout.startswith("balancebeam ")
    unknown = _balancebeam("no-such-command")
    assert unknown.returncode == 2 and "unknown command 'no-such-command'" in unknown.stderr


def test_the_command_waits_for_a_running_thread_that_is_not_a_daemon(tmp_path):
    marker = tmp_path / "written-by-the-thread"
    script = (
        "import sys, threading, time\n"
        "from pipeline import cli\n"
        f"def late(): time.sleep(0.5); open({str(marker)!r}, 'w').write('done')\n"
        "threading.Thread(target=late).start()\n"
        "sys.argv = ['balancebeam', '--version']\n"
        "cli.console_main()\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=_environment(), timeout=120)
    assert done.returncode == 0, done.stderr
    assert marker.read_text() == "done"
