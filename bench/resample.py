"""Benchmark of the release path: resample throughput against a raw tar-to-tar copy, and balance vs N.

Prints two tables, measured in this process: resample (1 and 2 workers) next to the copy of the
same shards, and the balance time for annotations replicated 1x, 10x, 100x (same signatures).
"""
import argparse
import io
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from pipeline import annotate, balance, plan, resample  # noqa: E402
from pipeline.records import ANNOTATION_SCHEMA  # noqa: E402

WORKERS = {1: ["--direct_running_mode=multi_processing", "--direct_num_workers=1"],
           2: ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]}
TARGET_RATIO = 0.5  # issue 4: resample should run at least half as fast as a plain copy


def raw_copy(shards, output_dir) -> int:
    """tarfile read -> tarfile write of every member: the floor any resampler pays."""
    samples = 0
    for index, shard in enumerate(shards):
        with tarfile.open(shard, "r|") as source, tarfile.open(os.path.join(output_dir, f"copy-{index:05d}.tar"),
                                                                "w|") as target:
            for member in source:
                data = source.extractfile(member).read()
                target.addfile(member, io.BytesIO(data))
                samples += member.name.endswith(".json")
    return samples


def timed(function, *args, **kwargs):
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return time.perf_counter() - started, result


def replicate_annotations(source_dir, target_dir, copies, base_rows):
    table = annotate.read_annotations(source_dir).slice(0, base_rows)
    keys = table.column("key").to_pylist()
    Path(target_dir).mkdir(parents=True, exist_ok=True)
    parts = [table.set_column(0, "key", pa.array([f"{k}-{i}" for k in keys])) for i in range(copies)]
    pq.write_table(pa.concat_tables(parts).cast(ANNOTATION_SCHEMA), os.path.join(target_dir, "annotations-00000.parquet"))
    return len(keys) * copies


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # 30,000 samples (~220 MB at 128px): each Beam run pays ~1.5-2 s of start-up (workers, job
    # graph) that a tar copy does not; at 6,000 samples (~45 MB) that fixed cost alone is twice the copy.
    parser.add_argument("--num-samples", type=int, default=30000)
    parser.add_argument("--balance-rows", type=int, default=6000,
                        help="annotation rows replicated 1x, 10x, 100x for the balance table")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--work", default=None,
                        help="scratch directory (default: a temporary one); data, annotations and solution "
                             "already there are reused")
    parser.add_argument("--skip-balance", action="store_true", help="only the resample table")
    args = parser.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-resample-"))
    from trainer.synth import SynthConfig, make_synthetic

    if not (work / "data" / "manifest.json").exists():
        make_synthetic(work / "data", SynthConfig(num_samples=args.num_samples, image_size=args.image_size,
                                                  samples_per_shard=1000))
    shards = sorted(str(p) for p in (work / "data" / "train").glob("*.tar"))
    input_bytes = sum(os.path.getsize(s) for s in shards)
    if not (work / "annotations").exists():
        annotate.run(["--input", str(work / "data" / "train" / "*.tar"), "--output", str(work / "annotations"),
                      *WORKERS[2]])
    config = plan.BalanceConfig(keep_rate="max", min_support=20, method="dual")
    if not (work / "solution.json").exists():
        balance.balance(str(work / "annotations"), str(work / "solution.json"), config, WORKERS[2])

    (work / "copy").mkdir(exist_ok=True)
    copy_seconds, copied = timed(raw_copy, shards, str(work / "copy"))
    rows = [("raw tar copy", copied, copy_seconds)]
    releases = []
    for workers, flags in WORKERS.items():
        seconds, manifest = timed(resample.resample, str(work / "data" / "train" / "*.tar"), str(work / "annotations"),
                                  str(work / "solution.json"), str(work / f"release-{workers}"), pipeline_args=flags)
        rows.append((f"resample, {workers} worker{'s' if workers > 1 else ''}", manifest["counts"]["samples_read"],
                     seconds))
        releases.append(manifest)
    print(f"\nresample: {len(shards)} shards, {copied} samples, {input_bytes / 1e6:.1f} MB "
          f"({args.image_size}px JPEG + txt + json), 2 cores")
    print("| run | samples | seconds | samples/s | MB/s | ratio to copy |")
    print("|---|---|---|---|---|---|")
    for name, samples, seconds in rows:
        print(f"| {name} | {samples} | {seconds:.2f} | {samples / seconds:.0f} | {input_bytes / 1e6 / seconds:.1f} | "
              f"{copy_seconds / seconds:.3f} |")
    print(f"(target ratio >= {TARGET_RATIO})")
    same = all(releases[0]["shards"] == other["shards"] for other in releases[1:])
    print(f"releases of every run byte-identical (names, sizes, sha256 of each shard): {'yes' if same else 'NO'}")
    if args.skip_balance:
        return

    print("\nbalance as N grows (same signatures):")
    print("| rows | signatures | balance seconds (count in Beam + solve) | solve seconds |")
    print("|---|---|---|---|")
    for copies in (1, 10, 100):
        directory = work / f"annotations-x{copies}"
        rows_count = replicate_annotations(work / "annotations", directory, copies, args.balance_rows)
        seconds, solution = timed(balance.balance, str(directory), str(work / f"solution-x{copies}" / "solution.json"),
                                  config, WORKERS[2])
        print(f"| {rows_count} | {solution.statistics['signatures_counted']} | {seconds:.2f} | "
              f"{solution.statistics['balance_seconds']:.3f} |")


if __name__ == "__main__":
    main()
