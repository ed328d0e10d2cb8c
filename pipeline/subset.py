"""The subset release: which records to keep, as files, without reading or copying a single image.

`resample --output-format subset` answers a pool held as metadata (DataComp, img2dataset) with
- `subset.npy`: DataComp's subset file, a sorted NumPy structured array of dtype ("u8,u8"), the
  128-bit hex uid of every kept record split into its upper and lower 64 bits (what DataComp's
  resharder loads with `np.load(mmap_mode="r")` and searches with `np.searchsorted`);
- `keep.parquet/`: a Parquet dataset (part files; `pyarrow.parquet.read_table` and pandas read the
  folder as one table) with one row per annotated record: key, q, kept copies, weight.
Decisions come from the annotations alone (exact counts, Bernoulli draws, weights and repeat copies
alike), so the kept set is the one a WebDataset release of the same solution and seed would hold.

Records are spread over buckets by key range (a uid's first byte), so each bucket is sorted on
its own and the buckets in order are the sorted whole: no worker holds more than one bucket, and
the driver writes subset.npy by appending the buckets' sorted arrays to its header.
"""
from __future__ import annotations

import collections
import hashlib
import io
import logging
import posixpath
import re
import zlib

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.typehints import KV

from pipeline.coders import Batch
from pipeline.counts import COUNTS_TAG, counted
from pipeline.file_shuffle import GroupTablesByFile, parts_by_bucket
from pipeline.files import atomic_create, delete_matching, write_bytes_atomically
from pipeline import publish
from pipeline.annotate import parquet_rows
from pipeline.publish import SUBSET_FILES

log = logging.getLogger(__name__)

SUBSET_FILE, KEEP_DIR = SUBSET_FILES
# DataComp's subset dtype: a uid's upper and lower 64 bits.
UID_DTYPE = np.dtype("u8,u8")
_UID = re.compile(r"[0-9a-fA-F]{32}\Z")
ROWS_PER_BUCKET = 250_000
MAX_BUCKETS = 256  # bucket = a uid's first byte scaled to the bucket count


def bucket_count(rows: int) -> int:
    return max(1, min(MAX_BUCKETS, -(-rows // ROWS_PER_BUCKET)))


def is_uid(key: str) -> bool:
    """A DataComp uid: 128 bits as 32 hex digits."""
    return bool(_UID.match(key))


def uid_pairs(uids) -> np.ndarray:
    """32-hex-digit uids (each one is_uid) -> DataComp's structured (upper, lower) uint64 array, in
    the order given."""
    halves = np.frombuffer(bytes.fromhex("".join(uids)), dtype=">u8").reshape(-1, 2)
    pairs = np.empty(len(halves), dtype=UID_DTYPE)
    pairs["f0"], pairs["f1"] = halves[:, 0], halves[:, 1]
    return pairs


def key_bucket(key: str, buckets: int) -> int:
    """A uid's bucket follows its numeric order (its first byte); any other key's, a hash of it."""
    if is_uid(key):
        return int(key[:2], 16) * buckets // 256
    return zlib.crc32(key.encode("utf-8", "surrogatepass")) % buckets


def _keep_schema():
    import pyarrow as pa

    return pa.schema([pa.field("key", pa.string(), nullable=False), pa.field("q", pa.float64()),
                      pa.field("copies", pa.int64()), pa.field("weight", pa.float64())])


_KEEP_COLUMNS = (("key", "keys"), ("q", "q"), ("copies", "copies"), ("weight", "weights"))


def keep_parts(shard_and_batch, buckets: int):
    """A batch of decisions -> (bucket, its rows) per bucket it touches, and what it kept as counts.
    """
    import pyarrow as pa

    _, batch = shard_and_batch
    copies = batch["copies"]
    kept_signatures = collections.Counter()
    for signature, n in zip(batch["signatures"], copies):
        if n:
            kept_signatures[signature] += n
    kept = sum(1 for n in copies if n)
    kept_not_uid = sum(1 for key, n in zip(batch["keys"], copies) if n and not is_uid(key))
    yield counted({"decided": len(copies), "kept": kept, "dropped": len(copies) - kept,
                         "output_samples": sum(copies), "kept_signatures": dict(kept_signatures),
                         "kept_not_uid": kept_not_uid})
    table = pa.Table.from_pydict({name: batch[column]
                                  for name, column in _KEEP_COLUMNS}, schema=_keep_schema())
    yield from parts_by_bucket(table, [key_bucket(key, buckets) for key in batch["keys"]])


def part_name(bucket: int, buckets: int) -> str:
    return f"part-{bucket:05d}-of-{buckets:05d}.parquet"


class WriteBucket(beam.DoFn):
    """(bucket, its rows as one table) -> its keep.parquet part file (sorted by key) and its sorted
    uids (a file in the work folder); yields what it wrote."""

    def __init__(self, output_dir: str, work_dir: str, buckets: int):
        self.output_dir, self.work_dir, self.buckets = output_dir, work_dir, buckets

    def process(self, bucket_and_table):
        import pyarrow.parquet as pq

        bucket, table = bucket_and_table
        table = table.sort_by([("key", "ascending")])
        path = FileSystems.join(self.output_dir, KEEP_DIR, part_name(bucket, self.buckets))
        sink = io.BytesIO()
        pq.write_table(table, sink)
        data = sink.getvalue()
        write_bytes_atomically(path, data)
        kept = [
            key
            for key, n in zip(table.column("key").to_pylist(),
                              table.column("copies").to_pylist()) if n and is_uid(key)
        ]
        uids = np.unique(uid_pairs(kept))  # sorted by (upper, lower): the uids' numeric order
        write_bytes_atomically(FileSystems.join(self.work_dir, f"uids-{bucket:05d}.bin"),
                               uids.tobytes())
        yield {"bucket": bucket, "part": part_name(bucket, self.buckets), "rows": table.num_rows,
               "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "uids": len(uids)}


class SubsetRelease(beam.PTransform):
    """Decision batches -> keep.parquet parts in `output_dir` and per-bucket uid files in
    `work_dir`.

    Outputs: "counts" (what was kept, as count dicts) and "written" (one list of what each bucket
    wrote).
    """

    def __init__(self, output_dir: str, work_dir: str, buckets: int):
        super().__init__()
        self.output_dir, self.work_dir, self.buckets = output_dir, work_dir, buckets

    def expand(self, decisions):
        parts = decisions | "KeepParts" >> beam.FlatMap(
            keep_parts, self.buckets).with_output_types(KV[int, Batch]).with_outputs(
                COUNTS_TAG, main="parts")
        written = (
            parts.parts
            | "GroupKeyBucket" >> GroupTablesByFile(self.work_dir)
            | "WriteBucket" >> beam.ParDo(WriteBucket(self.output_dir, self.work_dir, self.buckets))
            | "AllBuckets" >> beam.combiners.ToList())
        return {"counts": parts[COUNTS_TAG], "written": written}


def prepare_keep_dir(output_dir: str) -> None:
    """An empty keep.parquet folder (an earlier run's parts removed)."""
    folder = FileSystems.join(output_dir, KEEP_DIR)
    delete_matching(FileSystems.join(folder, "*"))
    # object stores have no folders
    if FileSystems.get_scheme(folder) is None and not FileSystems.exists(folder):
        FileSystems.mkdirs(folder)


def assemble_subset(buckets_written: list[dict], work_dir: str, output_dir: str) -> dict:
    """subset.npy from the buckets' sorted uid files, appended in bucket order after the .npy header
    (the driver holds one bucket at a time); returns its rows, bytes and sha256."""
    total = sum(entry["uids"] for entry in buckets_written)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": np.lib.format.dtype_to_descr(UID_DTYPE),
                                                  "fortran_order": False, "shape": (total,)})
    path = FileSystems.join(output_dir, SUBSET_FILE)
    digest, size = hashlib.sha256(), 0

    def chunks():
        yield header.getvalue()
        for entry in sorted(buckets_written, key=lambda e: e["bucket"]):
            yield _read(FileSystems.join(work_dir, f"uids-{entry['bucket']:05d}.bin"))

    with atomic_create(path) as handle:
        for chunk in chunks():
            handle.write(chunk)
            digest.update(chunk)
            size += len(chunk)
    return {"rows": total, "bytes": size, "sha256": digest.hexdigest()}


def _read(path: str) -> bytes:
    with FileSystems.open(path, compression_type="uncompressed") as handle:
        return handle.read()


def publish_subset(counts, written, rows_written, exact_counts, output_dir, prefix,
                   details) -> dict:
    """Reconcile a subset release with the files on disk, remove an earlier release's shards; the
    manifest."""
    parts = sorted(written["buckets"], key=lambda entry: entry["part"])
    parts_glob = FileSystems.join(output_dir, KEEP_DIR, "*.parquet")
    on_disk = {posixpath.basename(m.path): m.path
               for m in FileSystems.match([parts_glob])[0].metadata_list}
    footer_rows = sum(parquet_rows(path) for path in on_disk.values())
    numbers = publish.reconcile_subset(
        counts,
        {
            "keep_rows_written": footer_rows,
            "subset_rows_written": written["subset"]["rows"],
            "keep_parts_on_disk": sorted(on_disk),
            "keep_parts_written": [entry["part"] for entry in parts],
        },
        rows_written,
        exact_counts,
    )
    stale = delete_matching(FileSystems.join(output_dir, f"{prefix}-*"))
    if stale:
        log.info(
            "removed %d shard files of an earlier release (a subset release has none)", len(stale)
        )
    files = {
        SUBSET_FILE: written["subset"],
        KEEP_DIR: {
            "rows": footer_rows,
            "bytes": sum(entry["bytes"] for entry in parts),
            "parts": [
                {name: entry[name] for name in ("part", "rows", "bytes", "sha256")}
                for entry in parts
            ],
        },
    }
    manifest = publish.manifest(counts, numbers, [], details)
    manifest["counts"]["kept_not_uid"] = numbers["kept_not_uid"]
    manifest["files"] = files
    manifest["total_bytes"] = sum(entry["bytes"] for entry in files.values())
    return manifest
