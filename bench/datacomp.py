"""A DataComp pool from metadata to a subset file at 1M, 3M and 10M rows: time and peak memory.

Builds once (kept in --work) a DataComp-layout pool (bench/pool.py: Parquet metadata from real
COCO captions and an .npz of float16 768-d `l14_img` embeddings per 100,000-row shard) and the
prompts' embeddings of a ViT-L-14 (`balancebeam embed-prompts`; random weights, as no hub is
reachable here). Each image embedding carries a planted perceived gender along the prompts' own
man-woman direction: the caption's, where it names one; for people it does not name, "man" for
80% of captions whose first concept is in the first half of the concept list and "woman" for 80%
of the others, an association that only the image annotator can see.

Then, per size, `balancebeam run --output-format subset --prompt-embeddings prompts.npz
--embeddings-field l14_img --faces-column face_bboxes --keep-rate max --association-gap 0.05` with
two workers on the first N rows' shards, and prints seconds, rows/s and the peak resident memory of
all processes (the job's own reconciliation checks every row is accounted for).

Usage: python bench/datacomp.py [--sizes 1000000 3000000 10000000] [--work DIR] [--runs 1]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARD_ROWS = 100_000
DIMENSION = 768
ARCHITECTURE = "ViT-L-14"
TWO_WORKERS = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]
RUN_FLAGS = ["--keep-rate", "max", "--association-gap", "0.05", "--output-format", "subset",
             "--embeddings-field", "l14_img", "--faces-column", "face_bboxes"]
# Planted strength: bench.pool adds 4 x this vector to a standard-normal one (norm about sqrt(768) =
# 28) before normalising, so the planted component is about as long as the noise.
PLANTED_NORM = 7.0
UNNAMED_LEAN = 0.8
PERSON_WORDS = ("person", "people")  # bench.pool gives these captions (and man, woman) a face box


def prompts_file(work: pathlib.Path) -> pathlib.Path:
    path = work / "prompts-l14.npz"
    if not path.exists():
        from pipeline import cli

        started = time.perf_counter()
        assert cli.main(["embed-prompts", "--image-model", ARCHITECTURE, "--output",
                         str(path)]) == 0
        print(
            f"embedded the prompts with a random-weight {ARCHITECTURE} in "
            f"{time.perf_counter() - started:.0f} s"
        )
    return path


def planted_directions(prompts: pathlib.Path) -> np.ndarray:
    """One vector per COCO caption (bench.pool's caption order): the planted gender, or zeros."""
    import zlib

    from bench.pool import coco_captions
    from pipeline.annotators.lexicon import Lexicon
    from pipeline.annotators.text import TextAnnotator

    with np.load(prompts, allow_pickle=False) as stored:
        names = [str(n) for n in stored["group_names"]]
        group = names.index("perceived_gender")
        values = [str(v) for v in stored[f"group_{group}_values"]]
        vectors = stored[f"group_{group}"].astype(np.float64)
    man, woman = vectors[values.index("man")], vectors[values.index("woman")]
    axis = (man - woman) / np.linalg.norm(man - woman)
    concepts = sorted(Lexicon.load().concepts)
    first_half = set(concepts[:len(concepts) // 2])
    annotator = TextAnnotator()
    rows = []
    for caption in coco_captions():
        attributes, found, _ = annotator(caption)
        words = caption.lower().split()
        if "perceived_gender:man" in attributes and "perceived_gender:woman" not in attributes:
            sign = 1.0
        elif "perceived_gender:woman" in attributes and "perceived_gender:man" not in attributes:
            sign = -1.0
        elif any(word in words for word in PERSON_WORDS):
            lean_man = bool(found) and found[0] in first_half
            draw = zlib.crc32(caption.encode("utf-8")) % 1000 / 1000
            sign = 1.0 if (draw < UNNAMED_LEAN) == lean_man else -1.0
        else:
            sign = 0.0
        rows.append(sign * PLANTED_NORM * axis)
    return np.asarray(rows, dtype=np.float32)


def pool(work: pathlib.Path, rows: int, prompts: pathlib.Path) -> tuple[pathlib.Path, int]:
    """The pool's folder and its size: the one built before if it has at least `rows` rows (smaller
    sizes read its first shards), else a new one of `rows` rows in 100,000-row shards."""
    from bench.pool import make_pool

    directory = work / "pool"
    built = [int(marker.name.split("-")[1]) for marker in directory.glob(".complete-*")]
    if built and max(built) >= rows:
        return directory, max(built)
    shutil.rmtree(directory, ignore_errors=True)
    started = time.perf_counter()
    make_pool(directory, rows, rows // SHARD_ROWS, embeddings={"l14_img": DIMENSION},
              planted={"l14_img": planted_directions(prompts)}, row_group_size=SHARD_ROWS)
    (directory / f".complete-{rows}").write_text("")
    print(f"wrote a {rows:,}-row pool in {time.perf_counter() - started:.0f} s")
    return directory, rows


def shard_glob(directory: pathlib.Path, rows: int, total: int) -> str:
    """The first rows // 100,000 shards (00000000.parquet, ...) as one glob."""
    shards = rows // SHARD_ROWS
    if shards == total // SHARD_ROWS:
        return str(directory / "*.parquet")
    if shards <= 10:
        return str(directory / f"0000000[0-{shards - 1}].parquet")
    if shards % 10:
        raise SystemExit(
            f"--sizes must be 1M or a multiple of 1M up to the pool's size, got {rows}")
    return str(directory / f"000000[0-{shards // 10 - 1}][0-9].parquet")


# Each size runs in a fresh interpreter that samples its own memory: this process holds the pool
# generation's and the prompt model's heap (over 1 GB), and after torch's or a Beam job's threads
# it could not fork warm workers (pipeline/warm_workers.py), so an in-process run would count the
# one and time a slower start than the command has.
_CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})
from bench.memory import MemorySampler
sampler = MemorySampler()
started = time.perf_counter()
from pipeline import cli
code = cli.main(sys.argv[1:])
seconds = time.perf_counter() - started
print(json.dumps({{"code": code, "seconds": seconds, "peak_mib": sampler.stop() / 2**20}}))
"""


def run_size(pattern: str, output: pathlib.Path, prompts: pathlib.Path) -> dict:
    import subprocess

    shutil.rmtree(output, ignore_errors=True)
    child = subprocess.run(
        [sys.executable, "-c", _CHILD.format(root=str(ROOT)), "run", "--input", pattern,
         "--output", str(output), "--prompt-embeddings", str(prompts), *RUN_FLAGS, *TWO_WORKERS],
        stdout=subprocess.PIPE, text=True)
    lines = child.stdout.strip().splitlines()
    measured = json.loads(lines[-1]) if child.returncode == 0 and lines else {"code": None}
    if measured["code"] != 0:
        code = child.returncode if child.returncode else measured["code"]
        raise SystemExit(f"balancebeam run failed (exit {code}) on {pattern}")
    manifest = json.loads((output / "release" / "manifest.json").read_text())
    solution = json.loads((output / "solution.json").read_text())
    return {
        "seconds": measured["seconds"], "peak_mib": measured["peak_mib"],
        "read": manifest["counts"]["samples_read"], "kept": manifest["counts"]["kept"],
        "keep_rate": solution["keep_rate"]
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 3_000_000, 10_000_000])
    parser.add_argument("--runs", type=int, default=1, help="runs per size")
    parser.add_argument("--work", default="/tmp/balancebeam-datacomp")
    args = parser.parse_args(argv)
    work = pathlib.Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    from pipeline.cli import configure_logging

    configure_logging()
    total = max(args.sizes)
    if total % SHARD_ROWS:
        raise SystemExit(f"--sizes must be multiples of {SHARD_ROWS}")
    prompts = prompts_file(work)
    directory, total = pool(work, total, prompts)
    results = []
    for rows in sorted(args.sizes):
        for run in range(args.runs):
            result = run_size(shard_glob(directory, rows, total), work / "out", prompts)
            results.append({"rows": rows, "run": run + 1, **result})
            print(json.dumps(results[-1]), flush=True)
    shutil.rmtree(work / "out", ignore_errors=True)
    print(f"\nannotate -> balance -> subset, 2 workers, {DIMENSION}-d float16 embeddings "
          "(the job reconciled every row in every run)")
    print("| rows | run | seconds | rows/s | peak memory, all processes (MiB) | kept | keep rate |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['rows']:,} | {r['run']} | {r['seconds']:.0f} | {r['rows'] / r['seconds']:,.0f} "
            f"| {r['peak_mib']:,.0f} | {r['kept']:,} | {r['keep_rate']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
