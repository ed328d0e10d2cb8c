"""Output files written where their records are made, one per bundle, named by the driver later.

Beam's file sinks (WriteToParquetBatched, WriteToText) each add four stages to a job: an init step
before the main stage, a group of the writers' results, a pre-finalize and a finalize that renames.
Each stage costs the local runners 10-40 ms: on a 12,000-sample annotate job the two sinks made 6 of
the 17 stages after its main one and 2 of the 4 before it. Here a DoFn, fused with the
step that makes the records, writes each bundle's records to a file of its own in the job's spill
folder and reports the file in the job's counts (pipeline/counts.py): a nested dict {temporary path:
records} under a name of the caller's. Only committed bundles' counts reach the job's total, so
after the job the driver renames exactly the files listed there (`publish`), in the order of their
temporary names, to `<prefix>-SSSSS-of-NNNNN<suffix>`, the names Beam's sinks give. A retried
bundle's failed attempt leaves a file that nobody lists; the spill folder goes when the job ends.
"""
from __future__ import annotations

import collections
import json
import uuid

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindows

from pipeline.counts import COUNTS_TAG

_TEMPORARY_PREFIX = "bundle-"


def _temporary_path(spill_dir: str, suffix: str) -> str:
    return FileSystems.join(spill_dir, f"{_TEMPORARY_PREFIX}{uuid.uuid4().hex}{suffix}")


def parquet_writer(handle, schema):
    """A Parquet writer on an open file, as Beam's WriteToParquetBatched makes it: uncompressed,
    Arrow's legacy list names. Closed without a table, it leaves an empty file of `schema`."""
    import pyarrow.parquet as pq

    return pq.ParquetWriter(handle, schema, compression="none", use_compliant_nested_type=False)


class WriteTables(beam.DoFn):
    """pyarrow Tables -> one Parquet file per bundle (each table one row group), its path as the
    main output (emitted when the bundle ends) and {files_count: {path: rows}} as counts."""

    def __init__(self, spill_dir: str, schema, files_count: str):
        self.spill_dir, self.schema, self.files_count = spill_dir, schema, files_count

    def start_bundle(self):
        self._path, self._handle, self._writer, self._rows = None, None, None, 0

    def process(self, table):
        if self._writer is None:
            self._path = _temporary_path(self.spill_dir, ".parquet")
            self._handle = FileSystems.create(self._path,
                                              compression_type=CompressionTypes.UNCOMPRESSED)
            self._writer = parquet_writer(self._handle, self.schema)
        self._writer.write_table(table)
        self._rows += table.num_rows
        return ()

    def finish_bundle(self):
        if self._writer is None:
            return
        self._writer.close()
        self._handle.close()
        path, rows = self._path, self._rows
        self._path, self._handle, self._writer, self._rows = None, None, None, 0
        yield GlobalWindows.windowed_value(path)
        yield beam.pvalue.TaggedOutput(COUNTS_TAG, GlobalWindows.windowed_value(
            {self.files_count: {path: rows}}))


class WriteQuarantineLines(beam.DoFn):
    """Quarantine entries -> one JSONL file per bundle that has any (a sorted-keys JSON line per
    entry, as pipeline.quarantine.WriteQuarantine writes them) and, as counts, quarantined,
    quarantined_by_reason and {files_count: {path: lines}}: its main output, one count dict per
    such bundle."""

    def __init__(self, spill_dir: str, files_count: str):
        self.spill_dir, self.files_count = spill_dir, files_count

    def start_bundle(self):
        self._path, self._handle, self._reasons = None, None, collections.Counter()

    def process(self, entry):
        if self._handle is None:
            self._path = _temporary_path(self.spill_dir, ".jsonl")
            self._handle = FileSystems.create(self._path,
                                              compression_type=CompressionTypes.UNCOMPRESSED)
        self._handle.write(json.dumps(entry, sort_keys=True, ensure_ascii=False).encode("utf-8")
                           + b"\n")
        self._reasons[entry["reason"]] += 1
        return ()

    def finish_bundle(self):
        if self._handle is None:
            return
        self._handle.close()
        lines = sum(self._reasons.values())
        # plain data: quarantine_record counted each entry in Beam's metrics when it was made
        counts = {"quarantined": lines, "quarantined_by_reason": dict(self._reasons),
                  self.files_count: {self._path: lines}}
        self._path, self._handle, self._reasons = None, None, collections.Counter()
        yield GlobalWindows.windowed_value(counts)


def final_names(prefix: str, suffix: str, count: int) -> list[str]:
    """Beam's default shard names: <prefix>-00000-of-00002<suffix>, ..."""
    return [f"{prefix}-{index:05d}-of-{count:05d}{suffix}" for index in range(count)]


def publish(files: dict, prefix: str, suffix: str) -> list[str]:
    """Renames the temporary files a job listed in its counts (`files`: {path: records}) to their
    final names, in the order of their temporary names; returns the final names."""
    temporary = sorted(files)
    names = final_names(prefix, suffix, len(temporary))
    if temporary:
        FileSystems.rename(temporary, names)
    return names
