"""Scale harness: `balancebeam run` on a million caption rows and 100k tar samples, every local mode.

Builds the data from ../shared/data (COCO val2017 captions and the coco_mini JPEGs, replicated with
distinct keys), runs the whole job in-process, with two workers (several times) and through the
portable runner, and checks what only scale shows: every run reconciles its own counts (a job that
loses a record fails), quarantines nothing, and writes byte-identical releases (sha256 of every
shard). It prints a table with throughput and the peak memory of all processes, against a
single-process plain loop doing the same work (annotate, count signatures, solve, keyed-hash
sampling, tar writing), measured in the same run.

Usage: python bench/scale.py [--rows 1000000] [--tar-samples 100000] [--two-worker-runs 3]
       [--load 0] [--work DIR] [--modes in-process,two-workers,portable]
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

from bench.memory import MemorySampler  # noqa: E402

TWO_WORKERS = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]
IN_PROCESS = ["--direct_running_mode=in_memory"]
# The job's settings in every run (and in the plain loop): the issue's own command line.
RUN_FLAGS = ["--keep-rate", "max", "--association-gap", "0.05"]
SAMPLES_PER_TAR = 1000
MODES = ("in-process", "two-workers", "portable")


# --- data -------------------------------------------------------------------------------------------

def caption_table(path: pathlib.Path, rows: int) -> pathlib.Path:
    """COCO val2017 captions replicated to `rows` JSONL rows, keys CAPTIONID-rREPLICA (distinct)."""
    if path.exists() and sum(1 for _ in path.open()) == rows:
        return path
    annotations = json.loads((SHARED / "coco_val2017_captions.json").read_text())["annotations"]
    with path.open("w") as handle:
        for index in range(rows):
            replica, annotation = divmod(index, len(annotations))
            row = annotations[annotation]
            handle.write(json.dumps({"key": f"{row['id']}-r{replica}", "caption": row["caption"],
                                     "image_id": row["image_id"]}) + "\n")
    return path


def tar_set(directory: pathlib.Path, samples: int) -> str:
    """coco_mini's JPEGs replicated into img2dataset-style tars (KEY.jpg, KEY.txt, KEY.json)."""
    import webdataset

    pattern = str(directory / "coco-*.tar")
    marker = directory / f".complete-{samples}"
    if marker.exists():
        return pattern
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    coco_mini = SHARED / "coco_mini"
    captions, files = {}, {}
    for split in ("train2017", "val2017"):
        document = json.loads((coco_mini / f"captions_{split}.json").read_text())
        files.update({image["id"]: image["file_name"] for image in document["images"]})
        for annotation in document["annotations"]:
            captions.setdefault(annotation["image_id"], annotation["caption"].strip())
    pairs = [((coco_mini / "images" / files[i]).read_bytes(), captions[i], i) for i in sorted(files)]
    for shard in range(-(-samples // SAMPLES_PER_TAR)):
        with webdataset.TarWriter(str(directory / f"coco-{shard:05d}.tar")) as writer:
            for row in range(min(SAMPLES_PER_TAR, samples - shard * SAMPLES_PER_TAR)):
                jpeg, caption, image_id = pairs[(shard * SAMPLES_PER_TAR + row) % len(pairs)]
                key = f"{shard:05d}{row:04d}"
                writer.write({"__key__": key, "jpg": jpeg, "txt": caption.encode("utf-8"),
                              "json": json.dumps({"key": key, "image_id": image_id}).encode("utf-8")})
    marker.write_text("")
    return pattern


def input_bytes(pattern: str) -> int:
    import glob

    return sum(os.path.getsize(path) for path in glob.glob(pattern))


# --- the reference: one process, one loop, the same work ---------------------------------------------

def plain_loop(pattern: str, output: pathlib.Path, samples_per_shard: int, seed: int = 0) -> dict:
    """annotate -> count signatures -> solve -> exact-count sampling -> ordered tar shards, in one process.

    The same functions the job calls per record (reader, image check, lexicon, signature, solver and
    its integer program, keep rule, order hash, member index, shard writer), without Beam, and like
    the job it reads the input twice so that memory does not grow with the images: what the job's
    parallelism must beat.
    """
    import glob
    import heapq

    from apache_beam.pvalue import TaggedOutput

    from pipeline import balance, hashing, release
    from pipeline.annotators.text import TextAnnotator
    from pipeline.labelling import image_member
    from pipeline.shards import InputTars, tar_offsets
    from pipeline.signatures import SignatureTable, row_signature
    from pipeline.sources import iter_file_records
    from trainer.images import decode_image

    paths = [os.path.abspath(path) for path in sorted(glob.glob(pattern))]
    annotator = TextAnnotator()
    labels = {}  # key -> (attributes, concepts)
    for path in paths:  # pass 1: annotate
        for sample in iter_file_records(path):
            if isinstance(sample, TaggedOutput) or not (sample["caption"] or "").strip():
                continue
            if sample["members"]:
                decode_image(image_member(sample["members"]))
            attributes, concepts, _ = annotator(sample["caption"])
            labels[sample["key"]] = (attributes, concepts)
    counts = collections.Counter(row_signature(a, c) for a, c in labels.values())
    config = balance.config_from_args(balance_args())
    solution, _ = balance.solve_table(SignatureTable.from_counts(counts.items()), config)
    rule = release.KeepRule(solution, seed, "exact")
    decided = dict(zip(labels, rule.signatures_and_probabilities((a, c, None) for a, c in labels.values())))
    draws = collections.defaultdict(list)
    for key, (signature, _) in decided.items():
        if rule.exact_signature(signature) is not None:
            draws[signature].append((hashing.keyed_uniform(seed, key), key))
    thresholds = {signature: heapq.nsmallest(rule.exact_signature(signature)[1], found)[-1]
                  for signature, found in draws.items()}
    kept = {key: (signature, q) for key, (signature, q) in decided.items()
            if rule.copies(key, q, signature, thresholds.get(signature))}
    items = []
    for path in paths:  # pass 2: the kept records' members, images as their place in the tar
        index = None
        for sample in iter_file_records(path):
            if isinstance(sample, TaggedOutput) or sample["key"] not in kept:
                continue
            if sample["members"] and index is None:
                index = tar_offsets(path) or {}
            members = release.release_members(sample, {"q": kept[sample["key"]][1], "weight": 1.0})
            items.append((release.order_uniform(seed, sample["key"]), sample["key"], path,
                          release.locate_members(sample["key"], dict(members), index)))
    items.sort(key=lambda item: (item[0], item[1]))
    output.mkdir(parents=True, exist_ok=True)
    written, inputs = 0, InputTars()
    for shard, start in enumerate(range(0, len(items), samples_per_shard)):
        rows = [(key, list(release.read_members(located, lambda o, n, p=path: inputs.read_at(p, o, n)).items()))
                for _, key, path, located in items[start:start + samples_per_shard]]
        written += release.write_shard(str(output / release.shard_name("plain", shard)), rows)["samples"]
    inputs.close()
    return {"records": len(labels), "kept": written}


def balance_args():
    from pipeline import balance

    parser = argparse.ArgumentParser()
    balance.add_solve_arguments(parser)
    return parser.parse_args(RUN_FLAGS)


# --- the job in each mode --------------------------------------------------------------------------

@contextlib.contextmanager
def job_service():
    """A local Beam job service (the portable runner's endpoint) in its own process."""
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    service = subprocess.Popen([sys.executable, "-m", "apache_beam.runners.portability.local_job_service_main",
                                "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            with contextlib.suppress(OSError):
                socket.create_connection(("localhost", port), timeout=1).close()
                break
            time.sleep(0.2)
        yield ["--runner=PortableRunner", f"--job_endpoint=localhost:{port}", "--environment_type=LOOPBACK"]
    finally:
        service.terminate()
        service.wait(timeout=60)


@contextlib.contextmanager
def cpu_load(loops: int):
    """`loops` busy processes beside the job: parallel runners fail nondeterministically under load."""
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(loops)]
    try:
        yield
    finally:
        for process in busy:
            process.kill()
            process.wait()


def run_job(pattern: str, output: pathlib.Path, beam_args: list[str], samples_per_shard: int) -> dict:
    """`balancebeam run` in this process; returns the manifest (the job reconciles its own counts)."""
    from pipeline import cli

    shutil.rmtree(output, ignore_errors=True)
    code = cli.main(["run", "--input", pattern, "--output", str(output), *RUN_FLAGS,
                     "--samples-per-shard", str(samples_per_shard), *beam_args])
    if code != 0:
        raise SystemExit(f"balancebeam run failed (exit {code}) in {beam_args}")
    manifest = json.loads((output / "release" / "manifest.json").read_text())
    annotated = json.loads((output / "annotations" / "counts.json").read_text())
    manifest["annotate_quarantined"] = annotated["quarantined"]
    return manifest


_PLAIN_LOOP_CHILD = """
import json, pathlib, sys, time
sys.path.insert(0, {root!r})
from bench.memory import MemorySampler
from bench.scale import plain_loop
sampler = MemorySampler()
started = time.perf_counter()
result = plain_loop(sys.argv[1], pathlib.Path(sys.argv[2]), int(sys.argv[3]))
print(json.dumps({{"seconds": time.perf_counter() - started, "peak_mib": sampler.stop() / 2 ** 20, "result": result}}))
"""


def measure_plain_loop(pattern: str, output: pathlib.Path, samples_per_shard: int) -> dict:
    """The plain loop in a fresh interpreter, so its peak memory (and its heap) are its own."""
    child = subprocess.run([sys.executable, "-c", _PLAIN_LOOP_CHILD.format(root=str(ROOT)), pattern, str(output),
                            str(samples_per_shard)], capture_output=True, text=True, check=True)
    return {"run": "plain loop (1 process)", **json.loads(child.stdout.strip().splitlines()[-1])}


def measure(label, function, *args):
    sampler = MemorySampler()
    started = time.perf_counter()
    result = function(*args)
    seconds = time.perf_counter() - started
    return {"run": label, "seconds": seconds, "peak_mib": sampler.stop() / 2 ** 20, "result": result}


def bench_dataset(name, pattern, work, args) -> list[dict]:
    """The plain loop, then the job in every asked mode; checks and returns the table's rows."""
    size_mb = input_bytes(pattern) / 1e6
    runs = [measure_plain_loop(pattern, work / f"{name}-plain", args.samples_per_shard)]
    records = runs[0]["result"]["records"]
    shutil.rmtree(work / f"{name}-plain", ignore_errors=True)
    modes = []
    if "in-process" in args.modes:
        modes.append(("balancebeam run, in-process", IN_PROCESS))
    if "two-workers" in args.modes:
        modes += [(f"balancebeam run, 2 workers (#{i + 1})", TWO_WORKERS) for i in range(args.two_worker_runs)]
    manifests = []
    with cpu_load(args.load):
        for label, beam_args in modes:
            runs.append(measure(label, run_job, pattern, work / f"{name}-job", beam_args, args.samples_per_shard))
            manifests.append(runs[-1]["result"])
        if "portable" in args.modes:
            with job_service() as portable:
                runs.append(measure("balancebeam run, portable runner", run_job, pattern, work / f"{name}-job",
                                    portable, args.samples_per_shard))
            manifests.append(runs[-1]["result"])
    shutil.rmtree(work / f"{name}-job", ignore_errors=True)
    reference = manifests[0] if manifests else None
    for manifest in manifests:
        assert manifest["shards"] == reference["shards"], "releases differ between runs (sha256 of the shards)"
        assert manifest["counts"]["quarantined_total"] == 0 == manifest["annotate_quarantined"], manifest["counts"]
        assert manifest["counts"]["samples_read"] == records, (manifest["counts"], records)
    for run in runs:
        run.update(dataset=name, records=records, mb=size_mb)
    return runs


def print_table(runs, cores, load):
    print(f"\n{cores} cores, {load} busy loops beside the job; every job reconciled its counts, quarantined "
          "nothing and wrote byte-identical shards")
    print("| data | run | records | seconds | records/s | MB/s | peak memory, all processes (MiB) | ratio to plain loop |")
    print("|---|---|---|---|---|---|---|---|")
    reference = {}
    for run in runs:
        rate = run["records"] / run["seconds"]
        reference.setdefault(run["dataset"], rate)
        print(f"| {run['dataset']} | {run['run']} | {run['records']} | {run['seconds']:.1f} | {rate:,.0f} | "
              f"{run['mb'] / run['seconds']:.1f} | {run['peak_mib']:,.0f} | {rate / reference[run['dataset']]:.2f} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="caption-table rows (0: skip)")
    parser.add_argument("--tar-samples", type=int, default=100_000, help="samples in tars (0: skip)")
    parser.add_argument("--two-worker-runs", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {MODES}")
    parser.add_argument("--load", type=int, default=0, help="busy loops beside the Beam runs")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--work", help="folder for the data (kept between runs) and the releases")
    args = parser.parse_args(argv)
    args.modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    unknown = set(args.modes) - set(MODES)
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}; choose from {MODES}")
    work = pathlib.Path(args.work or tempfile.mkdtemp(prefix="balancebeam-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    from pipeline.cli import configure_logging

    configure_logging()
    runs = []
    if args.rows:
        runs += bench_dataset("captions", str(caption_table(work / f"captions-{args.rows}.jsonl", args.rows)),
                              work, args)
    if args.tar_samples:
        runs += bench_dataset("tars", tar_set(work / f"tars-{args.tar_samples}", args.tar_samples), work, args)
    print_table(runs, os.cpu_count(), args.load)
    return 0


if __name__ == "__main__":
    sys.exit(main())
