"""Scale check of annotate's duplicate-key path: a million caption rows plus later copies of some
keys, annotated with two workers, several times.

The scale harness (bench/scale.py) feeds clean data, so the step that takes later copies out of
the written annotation files (pipeline/dedup.py, DropDuplicateRows) never rewrites a file there.
This script appends `--duplicates` later copies (other captions, same keys) to the harness's
caption table and checks, from the files alone, after each run: every key once, the first copy
kept, exactly the appended copies quarantined as duplicate_key, and label-sets.jsonl equal to the
label sets of the rows written. Usage: python bench/duplicates.py [--rows 1000000] [--runs 2]
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import pathlib
import random
import shutil
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.scale import TWO_WORKERS, caption_table  # noqa: E402

LATER_CAPTION = "a later copy of this key: a woman in a kitchen"


def table_with_duplicates(work: pathlib.Path, rows: int, duplicates: int, seed: int = 7):
    """The harness's caption table plus `duplicates` later copies of random keys; returns (path,
    the copied keys, sorted)."""
    clean = caption_table(work / f"captions-{rows}.jsonl", rows).read_text().splitlines()
    copied = random.Random(seed).sample(range(rows), duplicates)
    path = work / f"captions-{rows}-plus-{duplicates}-copies.jsonl"
    with path.open("w") as handle:
        handle.write("\n".join(clean) + "\n")
        for index in copied:
            handle.write(json.dumps(dict(json.loads(clean[index]), caption=LATER_CAPTION)) + "\n")
    return path, sorted(json.loads(clean[index])["key"] for index in copied)


def check(output: pathlib.Path, rows: int, copied_keys: list[str]) -> dict:
    """The invariants, recomputed from the annotation, quarantine and label-set files."""
    from pipeline.annotate import LABEL_SETS_FILE, read_annotations, read_counts

    table = read_annotations(str(output))
    keys = table.column("key").to_pylist()
    assert len(keys) == len(set(keys)) == rows, (len(keys), len(set(keys)), rows)
    assert LATER_CAPTION not in set(table.column("caption").to_pylist()), "a later copy was kept"
    entries = [json.loads(line) for path in glob.glob(str(output / "quarantine-*.jsonl"))
               for line in open(path)]
    assert sorted(e["key"] for e in entries if e["reason"] == "duplicate_key") == copied_keys
    assert all(e["position"] >= rows for e in entries), "a first copy was quarantined"
    counted = collections.Counter()
    for line in (output / LABEL_SETS_FILE).read_text().splitlines():
        entry = json.loads(line)
        attributes, concepts, utility = entry["label_set"]
        counted[(tuple(sorted(attributes)), tuple(sorted(concepts)), utility)] += entry["count"]
    written = collections.Counter(
        (tuple(sorted(row["attributes"])), tuple(sorted(row["concepts"])), row["utility"])
        for row in table.select(["attributes", "concepts", "utility"]).to_pylist())
    assert counted == written, "label-sets.jsonl does not count the rows written"
    counts = read_counts(str(output))
    assert counts["annotated"] == rows and counts["quarantined"] == len(copied_keys), counts
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--duplicates", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--work", default="/tmp/balancebeam-scale")
    args = parser.parse_args(argv)
    work = pathlib.Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    path, copied_keys = table_with_duplicates(work, args.rows, args.duplicates)
    print(f"{args.rows:,} rows + {args.duplicates:,} later copies, `balancebeam annotate` with "
          "2 workers, checked from the files after each run")
    print("| run | seconds | annotated | duplicate_key quarantined | annotation files |\n"
          "|---|---:|---:|---:|---:|")
    for run in range(1, args.runs + 1):
        output = work / "duplicates-annotations"
        shutil.rmtree(output, ignore_errors=True)
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pipeline.cli", "--quiet", "annotate", "--input",
                        str(path), "--output", str(output), *TWO_WORKERS], cwd=ROOT, check=True)
        seconds = time.perf_counter() - started
        counts = check(output, args.rows, copied_keys)
        files = len(glob.glob(str(output / "annotations-*.parquet")))
        print(f"| {run} | {seconds:.1f} | {counts['annotated']:,} | "
              f"{counts['quarantined_by_reason'].get('duplicate_key', 0):,} | {files} |",
              flush=True)
    shutil.rmtree(work / "duplicates-annotations", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
