"""Minimal reproduction: Beam's multi-process DirectRunner can lose elements of a large join.

No balancebeam code: one ParDo reads a 1M-line JSONL file (one element fans out to a million
records), ReadFromParquet reads two Parquet files holding the same keys, CoGroupByKey joins them by
key, and each side is counted after the join. Every count must equal the number of rows; see
docs/beam-data-loss.md for what was observed and when.

Usage: python docs/repro/beam_multiprocess_join.py [--rows 1000000] [--workers 4] [--runs 3] \
           [--work DIR]
"""
import argparse
import json
import pathlib
import sys
import tempfile
import time

SHARED = pathlib.Path(__file__).resolve().parents[3] / "shared"
COCO_CAPTIONS = SHARED / "data" / "coco_val2017_captions.json"


def make_data(work: pathlib.Path, rows: int):
    """captions.jsonl (key, caption) and two Parquet files of (key, position), even and odd rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = work / f"captions-{rows}.jsonl"
    parquet = [work / f"keys-{rows}-{part}.parquet" for part in (0, 1)]
    if jsonl.exists() and all(path.exists() for path in parquet):
        return jsonl, str(work / f"keys-{rows}-*.parquet")
    if COCO_CAPTIONS.exists():
        captions = [a["caption"] for a in json.loads(COCO_CAPTIONS.read_text())["annotations"]]
    else:
        captions = [f"a person riding a bicycle past shop number {i}" for i in range(25000)]
    keys = [f"{i % len(captions)}r{i // len(captions)}" for i in range(rows)]
    with jsonl.open("w") as handle:
        for i, key in enumerate(keys):
            handle.write(json.dumps({"key": key, "caption": captions[i % len(captions)]}) + "\n")
    for part, path in enumerate(parquet):
        positions = list(range(part, rows, 2))
        pq.write_table(pa.table({"key": [keys[i] for i in positions], "position": positions}), path)
    return jsonl, str(work / f"keys-{rows}-*.parquet")


def read_jsonl(path):
    with open(path) as handle:
        for line in handle:
            row = json.loads(line)
            yield row["key"], row


def count_sides(element):
    _, groups = element
    return {
        "samples": len(list(groups["samples"])), "decisions": len(list(groups["decisions"])),
        "keys": 1
    }


def add(dicts):
    total = {}
    for counts in dicts:
        for name, value in counts.items():
            total[name] = total.get(name, 0) + value
    return total


def run_once(jsonl, parquet_glob, workers, output):
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    options = PipelineOptions([
        "--direct_running_mode=multi_processing", f"--direct_num_workers={workers}",
        "--default_sdk_harness_log_level=ERROR"
    ])
    with beam.Pipeline(options=options) as pipeline:
        samples = (pipeline
                   | "Path" >> beam.Create([str(jsonl)])
                   | "ReadJsonl" >> beam.FlatMap(read_jsonl))
        decisions = (pipeline
                     | beam.io.ReadFromParquet(parquet_glob, columns=["key", "position"])
                     | beam.Map(lambda row: (row["key"], row["position"])))
        _ = ({"samples": samples, "decisions": decisions}
             | beam.CoGroupByKey()
             | beam.Map(count_sides)
             | beam.CombineGlobally(add)
             | beam.Map(lambda counts: pathlib.Path(output).write_text(json.dumps(counts))))
    return json.loads(pathlib.Path(output).read_text())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--work", default=None)
    args = parser.parse_args(argv)
    work = pathlib.Path(args.work or tempfile.mkdtemp(prefix="beam-join-"))
    work.mkdir(parents=True, exist_ok=True)
    jsonl, parquet_glob = make_data(work, args.rows)
    lost_runs = 0
    for run in range(args.runs):
        started = time.time()
        counts = run_once(jsonl, parquet_glob, args.workers, work / "counts.json")
        lost = {
            side: args.rows - counts[side]
            for side in ("samples", "decisions") if counts[side] != args.rows
        }
        lost_runs += bool(lost)
        print(f"run {run + 1}: {counts} in {time.time() - started:.0f} s; "
              + (f"LOST {lost}" if lost else "complete"), flush=True)
    return 1 if lost_runs else 0


if __name__ == "__main__":
    sys.exit(main())
