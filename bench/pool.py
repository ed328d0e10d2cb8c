"""A DataComp-layout pool made from real COCO captions: Parquet metadata shards and their `.npz`
embeddings.

DataComp's pools are metadata: per shard a Parquet table (`uid`, `url`, `text`, `original_width`,
`original_height`, `clip_b32_similarity_score`, `clip_l14_similarity_score`, `face_bboxes`,
`sha256`) and an `.npz` of CLIP embeddings aligned row for row (`l14_img`, ...). This writes one
from ../shared/data/coco_val2017_captions.json (captions repeated with distinct uids), so the
subset path can be tested and measured without downloading a pool. Embeddings are optional
(`embeddings={"l14_img": 768}`): random float16 unit vectors, plus a planted direction per
perceived gender when `planted` vectors are given, so a zero-shot annotator has something to find.

Usage: python bench/pool.py --rows 1000000 --shards 100 --output pool/ [--embedding-dim 0]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def uid_of(index: int) -> str:
    """A 128-bit uid as 32 hex digits, like DataComp's (here the md5 of the row's index)."""
    return hashlib.md5(f"balancebeam-pool-{index}".encode()).hexdigest()


def coco_captions() -> list[str]:
    annotations = json.loads((SHARED / "coco_val2017_captions.json").read_text())["annotations"]
    return [row["caption"].strip() for row in annotations]


def make_pool(directory: pathlib.Path, rows: int, shards: int, embeddings: dict | None = None,
              planted: dict | None = None, seed: int = 0,
              row_group_size: int = 100_000) -> list[pathlib.Path]:
    """Write `shards` Parquet files (and .npz files when `embeddings` names fields and sizes)
    holding `rows` rows in all; returns the Parquet paths. planted: {field: (N, dim) array} added to
    each row's embedding by its caption's index modulo N (a direction the caption's content
    decides)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir(parents=True, exist_ok=True)
    captions = coco_captions()
    rng = np.random.default_rng(seed)
    paths = []
    bounds = np.linspace(0, rows, shards + 1).astype(np.int64)
    for shard in range(shards):
        start, end = int(bounds[shard]), int(bounds[shard + 1])
        index = np.arange(start, end)
        uids = [uid_of(int(i)) for i in index]
        text = [captions[i % len(captions)] for i in index]
        people = ("man", "woman", "person", "people")
        faces = [[[0.1, 0.1, 0.3, 0.3]] if any(w in t.lower().split() for w in people) else []
                 for t in text]
        table = pa.table({
            "uid": uids, "url": [f"https://example.invalid/{u}.jpg" for u in uids], "text": text,
            "original_width": rng.integers(200, 2000, len(index)),
            "original_height": rng.integers(200, 2000, len(index)),
            "clip_b32_similarity_score": rng.uniform(0.15, 0.4, len(index)),
            "clip_l14_similarity_score": rng.uniform(0.15, 0.4, len(index)),
            "face_bboxes": pa.array(faces, type=pa.list_(pa.list_(pa.float64()))),
            "sha256": [hashlib.sha256(u.encode()).hexdigest() for u in uids]})
        path = directory / f"{shard:08d}.parquet"
        pq.write_table(table, path, row_group_size=row_group_size)
        paths.append(path)
        if embeddings:
            arrays = {}
            for field, dim in embeddings.items():
                vectors = rng.standard_normal((len(index), dim), dtype=np.float32)
                if planted and field in planted:
                    directions = planted[field]
                    vectors += 4.0 * directions[index % len(directions)]
                vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
                arrays[field] = vectors.astype(np.float16)
            np.savez(directory / f"{shard:08d}.npz", **arrays)
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--shards", type=int, default=100)
    parser.add_argument("--embedding-dim", type=int, default=0,
                        help="l14_img dimension (0: no .npz files)")
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    embeddings = {"l14_img": args.embedding_dim} if args.embedding_dim else None
    paths = make_pool(pathlib.Path(args.output), args.rows, args.shards, embeddings)
    print(f"wrote {args.rows} rows in {len(paths)} Parquet shards to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
