"""Units of work: input files cut into ranges that different workers read, and records in batches.

A million-row JSONL file is one file: read whole, it would keep one worker busy while the other
waits. Uncompressed JSONL is cut at newlines every RANGE_BYTES and Parquet at row groups, and each
range knows the position (line or row number) of its first record, so a record's position is the
same however the file was cut. Every other input (tars, CSV, COCO JSON, compressed files) is one
range. Readers hand records on in batches, so no stage boundary pays Beam's per-element cost.
"""
from __future__ import annotations

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipeline import quarantine
from pipeline.counts import counted
from pipeline.progress import mark_range_read
from pipeline.worker_tuning import relax_gc
from pipeline.inputs import MatchInputFiles, detect_format, iter_file_records
from pipeline.sources import FORMAT_AUTO, FORMAT_JSONL, FORMAT_PARQUET
from pipeline.table_sources import (iter_parquet_samples, jsonl_record, read_jsonl_table,
                                     sample_table)

# About 40k caption rows of JSONL: big enough that a range's fixed cost is small, small enough
# that a 200k-row file already keeps two workers busy to the end (16 MiB left one waiting).
RANGE_BYTES = 4 * 1024 * 1024
PARQUET_RANGE_ROWS = 200_000
_SCAN_BLOCK = 8 * 1024 * 1024
# Records per batch out of a reader, and a cap on a batch's bytes (tar samples carry images).
RECORDS_PER_BATCH = 16384
BATCH_BYTES = 64 * 1024 * 1024


def plan_ranges(path: str, input_format: str = FORMAT_AUTO) -> list[dict]:
    """The ranges of one input file, in order: {path, index, format, start, end, first_position,
    ranges_in_file}.

    A range with start None is the whole file, read by the format's own reader.
    """
    ranges = _plan_ranges(path, input_format)
    for file_range in ranges:
        file_range["ranges_in_file"] = len(ranges)
    return ranges


def _plan_ranges(path: str, input_format: str) -> list[dict]:
    file_format = detect_format(path) if input_format == FORMAT_AUTO else input_format
    whole = [{
        "path": path, "index": 0, "format": file_format, "start": None, "end": None,
        "first_position": 0
    }]
    compressed = CompressionTypes.detect_compression_type(path) != CompressionTypes.UNCOMPRESSED
    try:
        if file_format == FORMAT_JSONL and not compressed:
            return _jsonl_ranges(path) or whole
        if file_format == FORMAT_PARQUET and not compressed:
            return _parquet_ranges(path) or whole
    except Exception:  # unreadable here: the whole-file reader quarantines it with the reason
        return whole
    return whole


def _jsonl_ranges(path: str) -> list[dict]:
    """Newline-aligned byte ranges of about RANGE_BYTES, with the line number each starts at."""
    size = FileSystems.match([path])[0].metadata_list[0].size_in_bytes
    if size <= RANGE_BYTES:
        return []
    ranges, start, lines_before, offset, lines = [], 0, 0, 0, 0
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        while True:
            block = handle.read(_SCAN_BLOCK)
            if not block:
                break
            cut_from = 0
            while offset + len(block) - start > RANGE_BYTES:
                newline = block.find(b"\n", max(cut_from, start + RANGE_BYTES - offset))
                if newline < 0:
                    break
                end = offset + newline + 1
                lines += block.count(b"\n", cut_from, newline + 1)
                ranges.append((start, end, lines_before))
                start, lines_before, cut_from = end, lines, newline + 1
            lines += block.count(b"\n", cut_from)
            offset += len(block)
    if start < offset:
        ranges.append((start, offset, lines_before))
    return [{
        "path": path, "index": i, "format": FORMAT_JSONL, "start": s, "end": e,
        "first_position": first
    } for i, (s, e, first) in enumerate(ranges)]


def _parquet_ranges(path: str) -> list[dict]:
    """Runs of whole row groups of about PARQUET_RANGE_ROWS rows."""
    import pyarrow.parquet as pq

    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        metadata = pq.ParquetFile(handle).metadata
    if metadata.num_rows <= PARQUET_RANGE_ROWS or metadata.num_row_groups < 2:
        return []
    ranges, groups, rows, first = [], [], 0, 0
    for group in range(metadata.num_row_groups):
        groups.append(group)
        rows += metadata.row_group(group).num_rows
        if rows - first >= PARQUET_RANGE_ROWS or group == metadata.num_row_groups - 1:
            ranges.append({"path": path, "index": len(ranges), "format": FORMAT_PARQUET,
                           "start": groups[0], "end": groups[-1] + 1, "first_position": first})
            groups, first = [], rows
    return ranges


def iter_range_records(file_range: dict, key_column="key", caption_column="caption",
                       embeddings_field=None, columns=None):
    """Samples of one range (and TaggedOutput quarantine entries), positions counted from the file's
    start.

    embeddings_field: Parquet rows also carry their image embedding from the .npz beside the file.
    columns: of a Parquet table, read only these (besides key, caption and embedding); None: all.
    """
    path = file_range["path"]
    if file_range["start"] is None:
        yield from iter_file_records(path, file_range["format"] or FORMAT_AUTO, key_column,
                                     caption_column, embeddings_field, columns)
        return
    try:
        if file_range["format"] == FORMAT_PARQUET:
            with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
                row_groups = list(range(file_range["start"], file_range["end"]))
                yield from iter_parquet_samples(handle, path, key_column, caption_column,
                                                row_groups, file_range["first_position"],
                                                embeddings_field, columns)
            return
        data = jsonl_range_bytes(file_range)
    except Exception as error:  # the file changed or vanished since it was planned
        yield quarantine.quarantined(
            quarantine.STAGE_READ, quarantine.UNREADABLE_FILE, None, path,
            file_range["first_position"],
            f"range {file_range['index']}: {type(error).__name__}: {error}")
        return
    yield from _jsonl_records(data, file_range, key_column, caption_column)


def range_lines(data: bytes) -> list[bytes]:
    """The lines of a JSONL range's bytes (a range ends with a newline: no partial line after it).
    """
    lines = data.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()
    return lines


def _jsonl_records(data: bytes, file_range: dict, key_column, caption_column):
    """The samples of a JSONL range's bytes, line by line."""
    path, first = file_range["path"], file_range["first_position"]
    for offset, line in enumerate(range_lines(data)):
        yield jsonl_record(line, path, first + offset, key_column, caption_column)


def jsonl_range_bytes(file_range: dict):
    """The bytes of a JSONL range, or of a whole small uncompressed JSONL file; None for any other
    range (and for an empty file, whose reader says so)."""
    if file_range["format"] != FORMAT_JSONL:
        return None
    path, start = file_range["path"], file_range["start"]
    if start is None and CompressionTypes.detect_compression_type(
            path) != CompressionTypes.UNCOMPRESSED:
        return None
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        if start is None:
            return handle.read() or None
        handle.seek(start)
        return handle.read(file_range["end"] - start)


def batches_of(records, size: int = RECORDS_PER_BATCH, max_bytes: int = BATCH_BYTES):
    """Lists of consecutive records, at most `size` records or about `max_bytes` of members each."""
    batch, weight = [], 0
    for record in records:
        batch.append(record)
        members = record.get("members")
        if members:  # a table row has none
            weight += sum(map(len, members.values()))
        if len(batch) >= size or weight >= max_bytes:
            yield batch
            batch, weight = [], 0
    if batch:
        yield batch


class PlanRanges(beam.PTransform):
    """Globs -> the ranges of every matched file, spread over the workers (a shuffle in between)."""

    def __init__(self, globs, input_format=FORMAT_AUTO):
        super().__init__()
        self.globs, self.input_format = globs, input_format

    def expand(self, pbegin):
        input_format = self.input_format
        return (pbegin
                | "MatchInputFiles" >> MatchInputFiles(self.globs)
                | "Plan" >> beam.FlatMap(lambda path: plan_ranges(path, input_format))
                | "SpreadRanges" >> beam.Reshuffle())


class ReadRangeBatches(beam.DoFn):
    """A range -> batches of its samples (main output), quarantine entries, and one count dict.

    With `tables`, a JSONL range pyarrow reads as json.loads would comes out as sample tables
    (table_sources.sample_table: key, shard, position, caption, image_id and, with
    `utility_field`, utility) instead of lists of sample dicts: what the text annotator needs,
    read in Arrow. Any other range, and one that needs json.loads, comes out as lists.
    """

    def __init__(self, key_column="key", caption_column="caption", embeddings_field=None,
                 progress_dir=None, columns=None, tables=False, utility_field=None):
        self.key_column, self.caption_column = key_column, caption_column
        self.embeddings_field = embeddings_field
        self.columns = columns  # of Parquet tables, the ones the job uses (None: all)
        self.progress_dir = progress_dir  # pipeline.progress: a marker per range read
        self.tables, self.utility_field = tables, utility_field

    def setup(self):
        relax_gc()

    def process(self, file_range):
        data = None
        if self.tables:
            try:
                data = jsonl_range_bytes(file_range)
            except Exception:  # the record reader below quarantines it with the reason
                data = None
        if data is not None:
            yield from self._from_bytes(file_range, data)
            return
        yield from self._batches(file_range, iter_range_records(
            file_range, self.key_column, self.caption_column, self.embeddings_field, self.columns))

    def _from_bytes(self, file_range, data):
        wanted = [self.key_column, self.caption_column, "image_id"]
        utility = [self.utility_field] if self.utility_field else []
        raw = read_jsonl_table(data, wanted + utility, numbers=utility)
        made = None if raw is None else sample_table(
            raw, file_range["path"], file_range["first_position"], self.key_column,
            self.caption_column, self.utility_field)
        if made is None:  # line by line; a whole file by its own reader, as without tables
            yield from self._batches(file_range, iter_range_records(
                file_range, self.key_column, self.caption_column) if file_range["start"] is None
                else _jsonl_records(data, file_range, self.key_column, self.caption_column))
            return
        table, entries = made
        yield from entries
        for start in range(0, table.num_rows, RECORDS_PER_BATCH):
            yield table.slice(start, RECORDS_PER_BATCH)
        mark_range_read(self.progress_dir, file_range, raw.num_rows)
        yield counted({"records_read": raw.num_rows, "read_quarantined": len(entries),
                       "ranges_read": 1})

    def _batches(self, file_range, records):
        tally = {"read": 0, "quarantined": 0}

        def samples():
            for output in records:
                tally["read"] += 1
                if isinstance(output, beam.pvalue.TaggedOutput):
                    tally["quarantined"] += 1
                    held.append(output)
                else:
                    yield output

        held = []
        for batch in batches_of(samples()):  # streamed: a tar's images are not all held at once
            yield from held
            held.clear()
            yield batch
        yield from held
        read, quarantined = tally["read"], tally["quarantined"]
        mark_range_read(self.progress_dir, file_range, read)
        yield counted({"records_read": read, "read_quarantined": quarantined, "ranges_read": 1})
