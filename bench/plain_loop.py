"""The scale harness's reference: `balancebeam run`'s work in one process, one plain loop
(annotate, count signatures, solve, exact-count keyed-hash sampling, tar shards or a subset file).

bench/scale.py measures it in the same run as the job, in a fresh interpreter (measure_plain_loop).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The job's settings in every run (and in the plain loop): the issue's own command line.
GAP = 0.05
RUN_FLAGS = ["--keep-rate", "max", "--association-gap", str(GAP)]
PLAIN_LOOP_RUN = "plain loop (1 process)"


def plain_loop(pattern: str, output: pathlib.Path, samples_per_shard: int, seed: int = 0,
               output_format: str = "webdataset") -> dict:
    """annotate -> count signatures -> solve -> exact-count sampling -> ordered tar shards, in one
    process.

    output_format "subset": the kept uids as DataComp's sorted subset.npy and every row's decision
    in keep.parquet instead of the second pass and the shards.

    The same functions the job calls per record (reader, image check, lexicon, signature, solver and
    its integer program, keep rule, order hash, member index, shard writer), without Beam, and like
    the job it reads the input twice so that memory does not grow with the images: what the job's
    parallelism must beat.
    """
    import glob
    import heapq

    from apache_beam.pvalue import TaggedOutput

    from pipeline import balance, hashing, plan, release, tars
    from pipeline.annotators.text import TextAnnotator
    from pipeline.labelling import image_member
    from pipeline.shards import InputTars, tar_offsets
    from pipeline.signatures import SignatureTable, row_signature
    from pipeline.inputs import iter_file_records
    from pipeline.worker_tuning import relax_gc
    from trainer.images import decode_image

    relax_gc()  # the job's workers run with it: the loop gets the same process settings
    paths = [os.path.abspath(path) for path in sorted(glob.glob(pattern))]
    annotator = TextAnnotator()
    labels = {}  # key -> (attributes, concepts)
    from pipeline.inputs import resolve_columns

    key_column, caption_column = resolve_columns(paths[:1])
    for path in paths:  # pass 1: annotate
        for sample in iter_file_records(path, key_column=key_column, caption_column=caption_column):
            if isinstance(sample, TaggedOutput) or not (sample["caption"] or "").strip():
                continue
            if sample["members"]:
                decode_image(image_member(sample["members"]))
            attributes, concepts, _ = annotator(sample["caption"])
            labels[sample["key"]] = (attributes, concepts)
    counts = collections.Counter(row_signature(a, c) for a, c in labels.values())
    config = balance.config_from_args(balance_args())
    solution, _ = plan.solve_table(SignatureTable.from_counts(counts.items()), config)
    rule = release.KeepRule(solution, seed, "exact")
    decided = dict(
        zip(labels, rule.signatures_and_probabilities((a, c, None) for a, c in labels.values())))
    draws = collections.defaultdict(list)
    for key, (signature, _) in decided.items():
        if rule.exact_signature(signature) is not None:
            draws[signature].append((hashing.keyed_uniform(seed, key), key))
    thresholds = {signature: heapq.nsmallest(rule.exact_signature(signature)[1], found)[-1]
                  for signature, found in draws.items()}
    kept = {key: (signature, q) for key, (signature, q) in decided.items()
            if rule.copies(key, q, signature, thresholds.get(signature))}
    if output_format == "subset":
        import numpy as np
        import pyarrow as pa
        import pyarrow.parquet as pq

        from pipeline.subset import uid_pairs

        output.mkdir(parents=True, exist_ok=True)
        keys = sorted(decided)
        pq.write_table(pa.table({"key": keys, "q": [decided[k][1] for k in keys],
                                 "copies": [int(k in kept) for k in keys],
                                 "weight": [1.0 for _ in keys]}), output / "keep.parquet")
        np.save(output / "subset.npy", np.sort(uid_pairs(list(kept))))
        return {"records": len(labels), "kept": len(kept)}
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
                          tars.locate_members(sample["key"], dict(members), index)))
    items.sort(key=lambda item: (item[0], item[1]))
    output.mkdir(parents=True, exist_ok=True)
    written, inputs = 0, InputTars()
    for shard, start in enumerate(range(0, len(items), samples_per_shard)):
        rows = [
            (key,
             list(tars.read_members(located, lambda o, n, p=path: inputs.read_at(p, o, n)).items()))
            for _, key, path, located in items[start:start + samples_per_shard]
        ]
        written += tars.write_shard(str(output / tars.shard_name("plain", shard)), rows)["samples"]
    inputs.close()
    return {"records": len(labels), "kept": written}


def balance_args():
    from pipeline import balance

    parser = argparse.ArgumentParser()
    balance.add_solve_arguments(parser)
    return parser.parse_args(RUN_FLAGS)


_PLAIN_LOOP_CHILD = """
import json, pathlib, sys, time
sys.path.insert(0, {root!r})
from bench.memory import MemorySampler
from bench.plain_loop import plain_loop
sampler = MemorySampler()
started = time.perf_counter()
result = plain_loop(sys.argv[1], pathlib.Path(sys.argv[2]), int(sys.argv[3]),
                    output_format=sys.argv[4])
print(json.dumps({{"seconds": time.perf_counter() - started, "peak_mib": sampler.stop() / 2 ** 20,
                  "result": result}}))
"""


def measure_plain_loop(pattern: str, output: pathlib.Path, samples_per_shard: int,
                       output_format: str) -> dict:
    """The plain loop in a fresh interpreter, so its peak memory (and its heap) are its own."""
    command = [sys.executable, "-c", _PLAIN_LOOP_CHILD.format(root=str(ROOT)), pattern, str(output),
               str(samples_per_shard), output_format]
    child = subprocess.run(command, capture_output=True, text=True, check=True)
    return {"run": PLAIN_LOOP_RUN, **json.loads(child.stdout.strip().splitlines()[-1])}
