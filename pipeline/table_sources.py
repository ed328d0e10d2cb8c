"""Reading caption tables (Parquet with optional .npz embeddings, JSONL, CSV) and COCO caption
JSON into samples: one iterator per format, bad rows as TaggedOutput quarantine entries.
"""
from __future__ import annotations

import csv
import json
import posixpath
import re

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from pipeline import quarantine
from pipeline.keys import safe_key
from pipeline.sources import make_sample

TABLE_BATCH_ROWS = 1024
# Largest CSV cell read (csv's own default is 128 KiB); a larger one makes its row a bad_row.
MAX_CSV_FIELD = 16 * 1024 * 1024


def _row_sample(row, shard, position, key_column, caption_column, has_key_column):
    """A table row as a sample; keys fall back to FILE#ROW when the table has no key column."""
    if has_key_column:
        key = row.get(key_column)
        if key is None or str(key) == "":
            return quarantine.quarantined(quarantine.STAGE_READ, quarantine.MISSING_KEY, None,
                                          shard, position, f"row {position} has no {key_column!r}")
    else:
        key = f"{posixpath.basename(shard)}#{position}"
    key = safe_key(str(key))  # the original stays in the row's json (its key column), see keys.py
    caption = row.get(caption_column)
    if isinstance(caption, bytes):
        try:
            caption = caption.decode("utf-8")
        except UnicodeDecodeError as error:
            return quarantine.quarantined(quarantine.STAGE_READ, quarantine.NON_UTF8_TEXT, str(key),
                                          shard, position, error)
    if caption is not None and not isinstance(caption, str):
        caption = str(caption)
    image_id = row.get("image_id")
    meta = {name: value for name, value in row.items() if name not in (caption_column,)}
    return make_sample(key, shard, position, caption, None, meta,
                   None if image_id is None else str(image_id))


def iter_parquet_samples(raw_file, shard, key_column, caption_column, row_groups=None,
                         first_position=0, embeddings_field=None, columns=None):
    """Rows of a Parquet table (of the given row groups only, numbered from first_position).

    embeddings_field: each sample also carries `embedding`, its row of that column or, when the
    table has no such column, of that array in the .npz file beside it (DataComp's layout: rows
    aligned).
    """
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(raw_file)
    has_key_column = key_column in parquet.schema_arrow.names
    if parquet.metadata.num_rows == 0:
        yield quarantine.quarantined(quarantine.STAGE_READ, quarantine.EMPTY_SHARD, None, shard,
                                     None, "table has no rows")
        return
    embeddings = None
    if embeddings_field and embeddings_field not in parquet.schema_arrow.names:
        embeddings = _npz_embeddings(shard, embeddings_field, parquet.metadata.num_rows)
        if isinstance(embeddings, str):  # no usable .npz: every row of this range says why
            position = first_position
            for batch in parquet.iter_batches(batch_size=TABLE_BATCH_ROWS, row_groups=row_groups,
                                              columns=[]):
                for _ in range(batch.num_rows):
                    yield quarantine.quarantined(quarantine.STAGE_READ, quarantine.BAD_EMBEDDING,
                                                 None, shard, position, embeddings)
                    position += 1
            return
    position = first_position
    # only these (and the key, caption and embedding) become the sample's meta
    if columns is not None:
        wanted = {*columns, key_column, caption_column, embeddings_field}
        columns = [name for name in parquet.schema_arrow.names if name in wanted]
    for batch in parquet.iter_batches(batch_size=TABLE_BATCH_ROWS, row_groups=row_groups,
                                      columns=columns):
        for row in batch.to_pylist():
            sample = _row_sample(row, shard, position, key_column, caption_column,
                                 has_key_column)
            if embeddings_field and not isinstance(sample, beam.pvalue.TaggedOutput):
                sample["embedding"] = embeddings[position] if embeddings is not None else row.get(
                    embeddings_field)
                sample["meta"].pop(embeddings_field, None)  # a vector is not metadata to copy along
            yield sample
            position += 1


def npz_path(parquet_path: str) -> str:
    """The .npz file DataComp keeps beside a metadata shard: same name, .npz instead of .parquet."""
    return re.sub(r"\.parquet$", "", parquet_path) + ".npz"


def _npz_embeddings(parquet_path: str, field: str, rows: int):
    """The shard's embeddings array (rows, dim), or a string saying why there is none to use."""
    import io

    import numpy as np

    path = npz_path(parquet_path)
    try:
        with FileSystems.open(path, compression_type="uncompressed") as handle:
            data = handle.read()
        with np.load(io.BytesIO(data), allow_pickle=False) as stored:
            if field not in stored.files:
                return f"{path} has no array {field!r} (it has {', '.join(stored.files)})"
            array = stored[field]
    except Exception as error:  # missing, not an npz, or pickled objects (refused)
        return f"cannot read embeddings {field!r} from {path}: {type(error).__name__}: {error}"
    if array.ndim != 2 or len(array) != rows:
        return f"{path}: {field!r} has shape {array.shape}, the table has {rows} rows"
    return array


def jsonl_record(line: bytes, shard, position, key_column, caption_column):
    """One JSONL line as a sample, or its quarantine entry."""
    try:
        row = json.loads(line.decode("utf-8"))
        if not isinstance(row, dict):
            raise ValueError(f"line is a {type(row).__name__}, not an object")
    except UnicodeDecodeError as error:
        return quarantine.quarantined(quarantine.STAGE_READ, quarantine.NON_UTF8_TEXT, None, shard,
                                      position, error)
    except ValueError as error:
        return quarantine.quarantined(quarantine.STAGE_READ, quarantine.BAD_JSON, None, shard,
                                      position, error)
    return _row_sample(row, shard, position, key_column, caption_column, True)


def iter_jsonl_samples(raw_file, shard, key_column, caption_column):
    position = -1
    for position, line in enumerate(raw_file):
        yield jsonl_record(line, shard, position, key_column, caption_column)
    if position < 0:
        yield quarantine.quarantined(quarantine.STAGE_READ, quarantine.EMPTY_SHARD, None, shard,
                                     None, "file has no lines")


def iter_csv_samples(raw_file, shard, key_column, caption_column):
    """Rows of a CSV table; a row that cannot be parsed is quarantined with its lines and the reader
    goes on with the next line, so one bad row never costs the rest of the file."""
    _raise_csv_field_limit()
    # surrogateescape keeps undecodable bytes visible per row, so one bad row is quarantined
    # instead of the whole file failing.
    lines = (line.decode("utf-8", errors="surrogateescape") for line in raw_file)
    reader = csv.reader(lines, strict=True)
    try:
        header = next(reader, None)
    except csv.Error as error:
        yield quarantine.quarantined(quarantine.STAGE_READ, quarantine.BAD_ROW, None, shard, None,
                                     f"header line: {error}")
        return
    if header is None:
        yield quarantine.quarantined(quarantine.STAGE_READ, quarantine.EMPTY_SHARD, None, shard,
                                     None, "file has no header")
        return
    position = 0
    while True:
        first_line = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as error:
            detail = f"lines {first_line}-{reader.line_num}: {error}"
            if "unexpected end of data" in str(error):
                detail = (
                    f"a quote opened on line {first_line} is never closed: lines {first_line}-"
                    f"{reader.line_num} (the rest of the file) could not be read as rows")
            yield quarantine.quarantined(quarantine.STAGE_READ, quarantine.BAD_ROW, None, shard,
                                         position, detail)
            position += 1
            continue
        if len(fields) != len(header):
            spanned = "" if reader.line_num == first_line else \
                f" (lines {first_line}-{reader.line_num}: a quoted field spans lines)"
            yield quarantine.quarantined(
                quarantine.STAGE_READ, quarantine.BAD_ROW, None, shard, position,
                f"{len(fields)} fields, header has {len(header)}{spanned}")
        else:
            try:
                "".join(fields).encode("utf-8")
            except UnicodeEncodeError as error:
                yield quarantine.quarantined(quarantine.STAGE_READ, quarantine.NON_UTF8_TEXT, None,
                                             shard, position, error)
            else:
                yield _row_sample(dict(zip(header, fields)), shard, position, key_column,
                                caption_column, key_column in header)
        position += 1
    if position == 0:
        yield quarantine.quarantined(quarantine.STAGE_READ, quarantine.EMPTY_SHARD, None, shard,
                                     None, "table has no rows")


def _raise_csv_field_limit():
    """csv's default field limit (128 KiB) is below a large metadata cell; raise it to
    MAX_CSV_FIELD."""
    if csv.field_size_limit() < MAX_CSV_FIELD:
        csv.field_size_limit(MAX_CSV_FIELD)


def iter_coco_samples(raw_file, shard):
    """One sample per caption of a COCO caption JSON; the key is the caption annotation's id."""
    try:
        document = json.loads(raw_file.read().decode("utf-8"))
        annotations = document["annotations"]
        if not isinstance(annotations, list):
            raise ValueError("'annotations' is not a list")
    except UnicodeDecodeError as error:
        yield quarantine.quarantined(quarantine.STAGE_READ, quarantine.NON_UTF8_TEXT, None, shard,
                                     None, error)
        return
    except (ValueError, KeyError, TypeError) as error:
        yield quarantine.quarantined(quarantine.STAGE_READ, quarantine.BAD_JSON, None, shard, None,
                                     f"not a COCO caption file: {error!r}")
        return
    if not annotations:
        yield quarantine.quarantined(quarantine.STAGE_READ, quarantine.EMPTY_SHARD, None, shard,
                                     None, "no annotations")
        return
    file_names = {image.get("id"): image.get("file_name") for image in document.get("images", [])
                  if isinstance(image, dict)}
    for position, annotation in enumerate(annotations):
        if not isinstance(annotation, dict) or annotation.get("id") is None:
            yield quarantine.quarantined(quarantine.STAGE_READ, quarantine.MISSING_KEY, None, shard,
                                         position, "annotation without an id")
            continue
        image_id = annotation.get("image_id")
        meta = dict(annotation, file_name=file_names.get(image_id))
        caption = annotation.get("caption")
        yield make_sample(safe_key(str(annotation["id"])), shard, position,
                      caption if isinstance(caption, str) else None, None, meta,
                      None if image_id is None else str(image_id))


# Column names tried in order when --caption-column / --key-column are not given: balancebeam's
# own, then DataComp's and img2dataset's metadata (`text` and `uid` in DataComp's Parquet).
