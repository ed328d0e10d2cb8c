"""Benchmark of the release path: resample throughput against a raw tar-to-tar copy, and balance vs
N.

Prints three tables, measured in this process: the shard writers (pipeline/tars.py's against
Python's tarfile and webdataset's TarWriter writing the same samples), resample (1 and 2 workers)
next to the copy of the same shards, and the balance time for annotations replicated 1x, 10x, 100x
(same signatures).
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
        with tarfile.open(shard, "r|") as source, tarfile.open(
                os.path.join(output_dir, f"copy-{index:05d}.tar"), "w|") as target:
            for member in source:
                data = source.extractfile(member).read()
                target.addfile(member, io.BytesIO(data))
                samples += member.name.endswith(".json")
    return samples


def _tarfile_write(raw, samples) -> None:
    """Python's tarfile, PAX format, our fixed header fields: the bytes tars.write_shard writes."""
    with tarfile.open(fileobj=raw, mode="w|", format=tarfile.PAX_FORMAT) as archive:
        for key, members in samples:
            for extension, data in members:
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size, info.mtime, info.mode = len(data), 0, 0o444
                info.uname = info.gname = ""
                archive.addfile(info, io.BytesIO(data))


def _webdataset_write(raw, samples) -> None:
    import webdataset

    writer = webdataset.TarWriter(raw)
    for key, members in samples:
        writer.write({"__key__": key, **dict(members)})
    writer.close()


def tar_writers(shards, caption_samples: int = 50_000, repeat: int = 3):
    """Samples/s of each shard writer on the same samples, best of `repeat`, written to memory:
    the synthetic shards' own samples (JPEG, txt, json), and caption-table samples (txt, json),
    whose members are small, so that headers are most of the work."""
    from pipeline import tars

    images = []
    for shard in shards[:5]:
        with tarfile.open(shard) as archive:
            samples = {}
            for member in archive.getmembers():
                key, _, extension = member.name.partition(".")
                samples.setdefault(key, []).append((extension, archive.extractfile(member).read()))
        images += samples.items()
    captions = [(f"{i}-r{i % 40}",
                 [("txt", b"A man riding a wave on top of a surfboard."),
                  ("json", b'{"balance": {"q": 0.888, "weight": 1.0}, "image_id": 123456, '
                   b'"key": "%d"}' % i)]) for i in range(caption_samples)]
    rows = []
    for name, samples in (("JPEG + txt + json", images), ("caption table: txt + json", captions)):
        outputs = {}
        for writer_name, write in (("tarfile (reference)", _tarfile_write),
                                   ("pipeline/tars.py", tars._write_tar), ("webdataset TarWriter",
                                                                           _webdataset_write)):
            best = float("inf")
            for _ in range(repeat):
                buffer = io.BytesIO()
                seconds, _ = timed(write, buffer, samples)
                best = min(best, seconds)
            outputs[writer_name] = buffer.getvalue()
            rows.append((name, writer_name, len(samples), best))
        same = outputs["pipeline/tars.py"] == outputs["tarfile (reference)"]
        rows.append(
            (name, f"tars.py bytes == tarfile bytes: {'yes' if same else 'NO'}", None, None))
    return rows


def print_tar_writers(rows) -> None:
    print("\nshard writers: the same samples into one in-memory tar (best of 3)")
    print("| samples | writer | samples | samples/s | vs tarfile |")
    print("|---|---|---|---|---|")
    reference = {}
    for name, writer, count, seconds in rows:
        if seconds is None:
            print(f"| {name} | {writer} | | | |")
            continue
        reference.setdefault(name, seconds)
        print(
            f"| {name} | {writer} | {count} | {count / seconds:,.0f} | "
            f"{reference[name] / seconds:.2f}x |"
        )


def timed(function, *args, **kwargs):
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return time.perf_counter() - started, result


def resample_command(pattern: str, work: Path, output: str, flags: list[str]) -> dict:
    """`balancebeam resample` as a user runs it, in a fresh interpreter (in this process, after the
    jobs above, it would get no warm workers: pipeline/warm_workers.py); returns its manifest."""
    import json
    import subprocess

    subprocess.run([sys.executable, "-m", "pipeline.cli", "resample", "--input", pattern,
                    "--annotations", str(work / "annotations"), "--solution",
                    str(work / "solution.json"), "--output", output, *flags],
                   check=True, cwd=Path(__file__).resolve().parents[1])
    return json.loads((Path(output) / resample.MANIFEST_FILE).read_text())


def replicate_annotations(source_dir, target_dir, copies, base_rows):
    table = annotate.read_annotations(source_dir).slice(0, base_rows)
    keys = table.column("key").to_pylist()
    Path(target_dir).mkdir(parents=True, exist_ok=True)
    parts = [
        table.set_column(0, "key", pa.array([f"{k}-{i}" for k in keys])) for i in range(copies)
    ]
    pq.write_table(pa.concat_tables(parts).cast(ANNOTATION_SCHEMA),
                   os.path.join(target_dir, "annotations-00000.parquet"))
    return len(keys) * copies


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # 30,000 samples (~220 MB at 128px): each Beam run pays ~1.5-2 s of start-up (workers, job
    # graph) that a tar copy does not; at 6,000 samples (~45 MB) that fixed cost alone is twice the
    # copy.
    parser.add_argument("--num-samples", type=int, default=30000)
    parser.add_argument("--balance-rows", type=int, default=6000,
                        help="annotation rows replicated 1x, 10x, 100x for the balance table")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument(
        "--work", default=None,
        help="scratch directory (default: a temporary one); data, annotations and solution "
        "already there are reused")
    parser.add_argument("--skip-balance", action="store_true", help="no balance table")
    parser.add_argument("--only-writers", action="store_true", help="only the shard writers' table")
    args = parser.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-resample-"))
    from trainer.synth import SynthConfig, make_synthetic

    if not (work / "data" / "manifest.json").exists():
        make_synthetic(
            work / "data",
            SynthConfig(num_samples=args.num_samples, image_size=args.image_size,
                        samples_per_shard=1000))
    shards = sorted(str(p) for p in (work / "data" / "train").glob("*.tar"))
    input_bytes = sum(os.path.getsize(s) for s in shards)
    print_tar_writers(tar_writers(shards))
    if args.only_writers:
        return
    if not (work / "annotations").exists():
        annotate.run([
            "--input", str(work / "data" / "train" / "*.tar"), "--output",
            str(work / "annotations"), *WORKERS[2]
        ])
    config = plan.BalanceConfig(keep_rate="max", min_support=20, method="dual")
    if not (work / "solution.json").exists():
        balance.balance(str(work / "annotations"), str(work / "solution.json"), config, WORKERS[2])

    (work / "copy").mkdir(exist_ok=True)
    copy_seconds, copied = timed(raw_copy, shards, str(work / "copy"))
    rows = [("raw tar copy", copied, copy_seconds)]
    releases = []
    for workers, flags in WORKERS.items():
        seconds, manifest = timed(resample_command, str(work / "data" / "train" / "*.tar"),
                                  work, str(work / f"release-{workers}"), flags)
        rows.append((f"resample, {workers} worker{'s' if workers > 1 else ''}",
                     manifest["counts"]["samples_read"], seconds))
        releases.append(manifest)
    print(f"\nresample: {len(shards)} shards, {copied} samples, {input_bytes / 1e6:.1f} MB "
          f"({args.image_size}px JPEG + txt + json), 2 cores")
    print("| run | samples | seconds | samples/s | MB/s | ratio to copy |")
    print("|---|---|---|---|---|---|")
    for name, samples, seconds in rows:
        print(
            f"| {name} | {samples} | {seconds:.2f} | {samples / seconds:.0f} | "
            f"{input_bytes / 1e6 / seconds:.1f} | {copy_seconds / seconds:.3f} |")
    print(f"(target ratio >= {TARGET_RATIO})")
    same = all(releases[0]["shards"] == other["shards"] for other in releases[1:])
    print(
        "releases of every run byte-identical (names, sizes, sha256 of each shard): "
        f"{'yes' if same else 'NO'}"
    )
    if args.skip_balance:
        return

    print("\nbalance as N grows (same signatures):")
    print("| rows | signatures | balance seconds (count in Beam + solve) | solve seconds |")
    print("|---|---|---|---|")
    for copies in (1, 10, 100):
        directory = work / f"annotations-x{copies}"
        rows_count = replicate_annotations(work / "annotations", directory, copies,
                                           args.balance_rows)
        seconds, solution = timed(
            balance.balance, str(directory), str(work / f"solution-x{copies}" / "solution.json"),
            config, WORKERS[2]
        )
        print(
            f"| {rows_count} | {solution.statistics['signatures_counted']} | {seconds:.2f} | "
            f"{solution.statistics['balance_seconds']:.3f} |"
        )


if __name__ == "__main__":
    main()
