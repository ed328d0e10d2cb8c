"""Nothing lost: reconciliation that fails jobs, publishing that is all or nothing, bad options
refused before a job runs, and smaller defects (keys, hostile input: tests/test_bad_input.py).

Each test pins one promise of issue 9 with data built here (or the real coco_mini shards) and checks
it from the files a job wrote, read back by other readers (webdataset, tarfile), not from the job's
own bookkeeping.
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from pipeline import annotate, cli, publish, resample, shards, tars
from pipeline.errors import ReconciliationError
from caption_rows import balanced_rows, write_jsonl

# --- reconciliation -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("small_run")
    table = write_jsonl(work / "captions.jsonl",
                         balanced_rows([f"key{i:03d}" for i in range(40)]))
    output = work / "run"
    assert cli.main(["run", "--input", str(table), "--output", str(output), "--keep-rate", "1",
                     "--min-support", "1", "--samples-per-shard", "7"]) == 0
    return table, output


def _resample_again(small_run, release_dir, *args):
    table, output = small_run
    return cli.main([
        "resample", "--input", str(table), "--annotations", str(output / "annotations"),
        "--solution", str(output / "solution.json"), "--output", str(release_dir),
        "--samples-per-shard", "7", *args
    ])


@pytest.mark.parametrize("fault",
                         ["shard_loses_a_sample", "bucket_loses_a_copy", "decisions_lose_a_row"])
def test_a_job_that_loses_records_fails_and_publishes_nothing(small_run, tmp_path, monkeypatch,
                                                              capsys, fault):
    """The in-process runner runs DoFns in this process, so a fault injected here happens inside the
    job."""
    if fault == "shard_loses_a_sample":
        write_shard = tars.write_shard
        monkeypatch.setattr(tars, "write_shard",
                            lambda path, samples: write_shard(path,
                                                              list(samples)[1:]))
    elif fault == "bucket_loses_a_copy":
        sort_and_rank = shards.sort_and_rank

        def sort_but_lose_a_copy(element, *args):
            for shard, group in sort_and_rank(element, *args):
                yield shard, group[1:]

        monkeypatch.setattr(shards, "sort_and_rank", sort_but_lose_a_copy)
    else:
        process = resample.Decide.process

        def decide_but_lose_a_row(self, table, solution_text, thresholds):
            for out in process(self, table, solution_text, thresholds):
                if isinstance(out, tuple):
                    out = (out[0], {name: values[1:] for name, values in out[1].items()})
                yield out

        monkeypatch.setattr(resample.Decide, "process", decide_but_lose_a_row)
    release_dir = tmp_path / "release"
    assert _resample_again(small_run, release_dir) == 1
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "did not account for every record" in error
    assert not (release_dir / "manifest.json").exists()
    assert not (release_dir / "sizes.json").exists()


def test_reconcile_names_the_numbers_that_disagree():
    counts = {
        "decisions_read": 10, "decisions_grouped": 10, "decisions_joined": 10, "samples_read": 12,
        "kept": 6, "dropped": 4, "records_quarantined": 1, "output_samples": 6,
        "quarantined": {"resample:not_annotated": 1}, "kept_signatures": {"[]": 6}
    }
    shards = [{"name": "b-00000.tar", "index": 0, "samples": 6}]
    with pytest.raises(ReconciliationError) as raised:
        publish.reconcile(counts, shards, 10, 1, 10)
    assert "kept + dropped + quarantined at resample = records read: 11 != 12" in str(raised.value)
    assert raised.value.counts["samples_read"] == 12
    counts["records_quarantined"] = 2
    counts["quarantined"] = {"resample:not_annotated": 2}
    assert publish.reconcile(counts, shards, 10, 2, 10)["kept"] == 6


def test_annotate_refuses_to_finish_when_its_files_disagree_with_its_counts(
        tmp_path, monkeypatch, capsys):
    table = write_jsonl(tmp_path / "t.jsonl", balanced_rows(["a", "b", "c", "d"]))
    monkeypatch.setattr(annotate, "annotation_rows", lambda directory: 3)
    assert cli.main(["annotate", "--input", str(table), "--output", str(tmp_path / "ann")]) == 1
    assert "annotation rows in the Parquet files = annotated: 3 != 4" in capsys.readouterr().err
    assert not (tmp_path / "ann" / "counts.json").exists()


# --- publishing -----------------------------------------------------------------------------------

def test_a_killed_resample_leaves_no_release_and_a_rerun_equals_a_clean_run(small_run, tmp_path):
    table, output = small_run
    release_dir = tmp_path / "release"
    # an older release
    assert _resample_again(small_run, release_dir, "--samples-per-shard", "3") == 0
    old_manifest = (release_dir / "manifest.json").read_text()
    (release_dir / "report.html").write_text("<p>report of the older release</p>")
    command = [
        sys.executable, "-m", "pipeline.cli", "resample", "--input", str(table), "--annotations",
        str(output / "annotations"), "--solution", str(output / "solution.json"), "--output",
        str(release_dir), "--samples-per-shard", "7"
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.time() + 120
    manifest = release_dir / "manifest.json"
    while manifest.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    # killed after it unpublished the old release: no manifest, card or report describes the shards
    # now
    manifest_now = release_dir / "manifest.json"
    assert not manifest_now.exists() or manifest_now.read_text() != old_manifest
    if not manifest_now.exists():
        assert not (release_dir / "report.html").exists()
        assert not (release_dir / "README.md").exists()
    assert _resample_again(small_run, release_dir) == 0
    clean = tmp_path / "clean"
    assert _resample_again(small_run, clean) == 0
    rerun, reference = (json.loads((d / "manifest.json").read_text()) for d in (release_dir, clean))
    assert rerun["shards"] == reference["shards"] and rerun["counts"] == reference["counts"]
    assert sorted(p.name for p in release_dir.iterdir() if p.is_file()) == \
        sorted(p.name for p in clean.iterdir() if p.is_file())


# --- options --------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, words", [
    (["--keep-rate", "0"], "--keep-rate must be a number in (0, 1]"),
    (["--keep-rate", "1.5"], "--keep-rate must be a number in (0, 1]"),
    (["--keep-rate", "most"], "--keep-rate must be a number in (0, 1]"),
    (["--association-gap", "-0.1"], "--association-gap must be a number >= 0"),
    (["--samples-per-shard", "0"], "--samples-per-shard must be >= 1"),
    (["--mode", "repeat", "--output-size", "0"], "--output-size must be >= 1"),
    (["--seed", "-1"], "--seed must be a whole number"),
    (["--seed", str(2 ** 64)], "--seed must be a whole number"),
    (["--max-image-pixels", "0"], "--max-image-pixels must be >= 1"),
    (["--prefix", "../x"], "--prefix must be"),
    (["--direct_num_wokers=2"], "unrecognised arguments: --direct_num_wokers=2"),
    (["more.jsonl", "other.jsonl"], "unquoted glob"),
])
def test_bad_options_are_refused_in_one_line_before_any_job_runs(tmp_path, capsys, flags, words):
    table = write_jsonl(tmp_path / "t.jsonl", balanced_rows(["a", "b"]))
    output = tmp_path / "out"
    assert cli.main(["run", "--input", str(table), "--output", str(output), *flags]) == 2
    error = capsys.readouterr().err.strip()
    assert words in error and error.count("\n") == 0
    assert not (output / "annotations").exists()


def test_an_output_that_cannot_be_a_directory_is_refused(tmp_path, capsys):
    table = write_jsonl(tmp_path / "t.jsonl", balanced_rows(["a", "b"]))
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    for output, words in ((blocker, "is a file, not a directory"), (blocker / "sub",
                                                                    "cannot be created")):
        assert cli.main(["run", "--input", str(table), "--output", str(output)]) == 2
        error = capsys.readouterr().err.strip()
        assert words in error and error.count("\n") == 0


def test_a_wide_gap_is_allowed_with_a_warning(caplog):
    from pipeline.plan import BalanceConfig

    BalanceConfig(association_gap=0.6)
    assert "constrains nothing" in caplog.text


# --- smaller defects ------------------------------------------------------------------------------

def test_one_signature_says_nothing_to_balance(tmp_path, capsys):
    table = write_jsonl(tmp_path / "t.jsonl",
                         [{"key": f"k{i}", "caption": "a man"} for i in range(5)])
    assert cli.main(["run", "--input", str(table), "--output", str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err.strip()
    assert "nothing to balance" in error and error.count("\n") == 0


def test_quarantine_details_are_the_same_in_two_runs(tmp_path, webdataset_writer):
    shards = webdataset_writer(
        tmp_path / "in", [{"__key__": f"bad{i}", "jpg": b"not an image at all", "txt": b"a man"}
                          for i in range(3)], 10, prefix="broken")
    texts = []
    for run in ("one", "two"):
        output = tmp_path / run
        assert cli.main(["annotate", "--input", str(shards[0]), "--output", str(output)]) == 0
        texts.append(
            sorted("".join(p.read_text() for p in output.glob("quarantine-*.jsonl")).splitlines()))
    assert texts[0] == texts[1] and len(texts[0]) == 3
    assert all("undecodable_image" in line and " at 0x" not in line for line in texts[0])


def test_report_and_card_survive_names_that_mean_something_to_matplotlib_and_markdown(tmp_path):
    from pipeline import report

    name = "$\\bogus{x}$ | *bold* <b>"  # not a mathtext formula: matplotlib would raise on it
    shares = {"concepts": {name: {"support": {"g": 60.0}, "shares": {"g:a": 0.5, "g:b": 0.5}}}}
    stats = {"shares": {"before": shares, "realized": shares},
             "targets": {"g:a": 0.5, "g:b": 0.5}, "proxies": [{"concept": name, "score": 0.1}]}
    assert report.plot_heatmaps(stats) and report.plot_proxies(stats)
    assert report.markdown_text(name) == "$\\\\bogus\\{x\\}$ \\| \\*bold\\* \\<b\\>"


def test_the_trainer_decodes_only_allowed_formats_within_the_pixel_limit():
    import io

    from PIL import Image

    from trainer import images
    from trainer.data import decode_sample

    gif = io.BytesIO()
    Image.new("RGB", (4, 4)).save(gif, format="GIF")
    with pytest.raises(images.ImageRejected):
        decode_sample(
            {"__key__": "k", "gif": gif.getvalue(), "jpg": gif.getvalue(), "txt": b"a man"})
    big = io.BytesIO()
    Image.new("L", (3000, 3000)).save(big, format="PNG")
    with pytest.raises(images.ImageRejected, match="pixels"):
        images.decode_image(big.getvalue(), max_pixels=1_000_000)
    assert np.asarray(images.decode_image(big.getvalue())).shape == (3000, 3000, 3)


def test_atomic_create_publishes_whole_files_or_nothing(tmp_path):
    """The one way balancebeam writes a file (shards, subset.npy, manifests, study results): a
    failure while writing leaves the old file and no temporary; success replaces it whole."""
    from pipeline.files import atomic_create

    path = tmp_path / "data.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_create(str(path)) as handle:
            handle.write(b"half of the new")
            raise RuntimeError("the writer died")
    assert path.read_bytes() == b"old" and sorted(p.name
                                                  for p in tmp_path.iterdir()) == ["data.bin"]
    with atomic_create(str(path)) as handle:
        handle.write(b"new ")
        assert path.read_bytes() == b"old"  # nothing under the final name until the block ends
        handle.write(b"content")
    assert path.read_bytes() == b"new content" and sorted(
        p.name for p in tmp_path.iterdir()) == ["data.bin"]


def test_counts_travel_as_data_that_adds_up_and_show_as_beam_counters():
    """pipeline.counts: a step's count dict is data (summed across elements and producers, nested
    dicts key by key) and, as a view of the same numbers, Beam counters of the same names."""
    import apache_beam as beam
    from apache_beam.metrics.metric import MetricsFilter
    from apache_beam.testing.util import assert_that, equal_to

    from pipeline.counts import COUNTS_TAG, AddCounts, counted
    from pipeline.options import pipeline_options

    class Step(beam.DoFn):
        def process(self, n):
            yield n
            yield counted({"records_read": n, "kept": n // 2, "zero": 0,
                           "quarantined_by_reason": {"bad_json": n, "empty": 1}})

    pipeline = beam.Pipeline(options=pipeline_options(["--direct_running_mode=in_memory"]))
    first = pipeline | "First" >> beam.Create([2, 3]) | "StepA" >> beam.ParDo(Step()).with_outputs(
        COUNTS_TAG, main="n")
    second = pipeline | "Second" >> beam.Create([7]) | "StepB" >> beam.ParDo(Step()).with_outputs(
        COUNTS_TAG, main="n")
    totals = (first[COUNTS_TAG], second[COUNTS_TAG]) | AddCounts()
    assert_that(totals, equal_to([{"records_read": 12, "kept": 1 + 1 + 3, "zero": 0,
                                   "quarantined_by_reason": {"bad_json": 12, "empty": 3}}]))
    result = pipeline.run()
    result.wait_until_finish()

    def counter(name):
        found = result.metrics().query(
            MetricsFilter().with_namespace("balancebeam").with_name(name)
        )["counters"]
        return sum(metric.committed for metric in found)

    assert (counter("records_read"), counter("kept"), counter("zero")) == (12, 5, 0)
    assert counter("quarantined_by_reason") == 0  # nested dicts stay data
