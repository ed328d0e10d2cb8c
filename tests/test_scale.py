"""The scale harness at CI's size: 200,000 caption rows, in-process and with two workers.

bench/scale.py runs a million rows (and 100k tar samples) several times; here one run of each mode
at a fifth of that checks what only size shows: every job reconciles its counts (a lost record
fails the job), nothing is quarantined, and both runs write byte-identical releases.
"""
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bench import scale  # noqa: E402

ROWS = 200_000


@pytest.mark.slow
def test_200k_caption_rows_reconcile_and_match_across_runners(shared_data, tmp_path):
    table = str(scale.caption_table(tmp_path / "captions.jsonl", ROWS))
    in_process = scale.run_job(table, tmp_path / "in-process", scale.IN_PROCESS, 1000)
    two_workers = scale.run_job(table, tmp_path / "two-workers", scale.TWO_WORKERS, 1000)
    for manifest in (in_process, two_workers):
        counts = manifest["counts"]
        assert counts["samples_read"] == ROWS and counts["quarantined_total"] == 0
        assert manifest["annotate_quarantined"] == 0
        assert counts["kept"] + counts["dropped"] == ROWS
        assert sum(shard["samples"] for shard in manifest["shards"]) == counts["output_samples"] == counts["kept"]
    assert two_workers["shards"] == in_process["shards"]  # names, sizes and sha256 of every shard
    assert 0.8 * ROWS < in_process["counts"]["kept"] < ROWS
