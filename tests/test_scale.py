"""The scale harness at CI's size: 200,000 caption rows with two workers, resampled again
in-process.

bench/scale.py runs a million rows (and 100k tar samples) several times; here one run at a fifth
of that checks what only size shows: every job reconciles its counts (a lost record fails the
job), nothing is quarantined, and the release is byte-identical when the same annotations and
solution are resampled in one process.
"""
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bench import scale  # noqa: E402

ROWS = 200_000


@pytest.mark.slow
def test_200k_caption_rows_reconcile_and_match_across_runners(shared_data, tmp_path):
    from pipeline import resample

    table = str(scale.caption_table(tmp_path / "captions.jsonl", ROWS))
    two_workers = scale.run_job(table, tmp_path / "two-workers", scale.TWO_WORKERS, 1000)
    # The same annotations and solution resampled in one process: the same release, byte for byte.
    in_process = resample.resample(table, str(tmp_path / "two-workers" / "annotations"),
                                   str(tmp_path / "two-workers" / "solution.json"),
                                   str(tmp_path / "in-process"), samples_per_shard=1000,
                                   pipeline_args=scale.IN_PROCESS)
    counts = two_workers["counts"]
    assert counts["samples_read"] == ROWS and counts["quarantined_total"] == 0
    assert two_workers["annotate_quarantined"] == 0
    assert counts["kept"] + counts["dropped"] == ROWS
    assert (
        sum(shard["samples"] for shard in two_workers["shards"])
        == counts["output_samples"]
        == counts["kept"]
    )
    assert 0.8 * ROWS < counts["kept"] < ROWS
    assert in_process["shards"] == two_workers["shards"]  # names, sizes and sha256 of every shard
    assert in_process["counts"] == counts
