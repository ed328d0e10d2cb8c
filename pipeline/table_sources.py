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


# A line of nothing but JSON whitespace: json.loads quarantines it, pyarrow's reader skips it.
# (The newline that ends the last line starts no line.)
_BLANK_LINE = re.compile(rb"(?:\A|\n)[ \t\r]*\n|(?:\A|\n)[ \t\r]+\Z")
_MAX_TABLE_BYTES = 1 << 30


def _has_blank_line(data: bytes) -> bool:
    # the regular expression tries every byte; a line that starts with whitespace is rare
    if data[:1] in b" \t\r\n" or any(start in data for start in (b"\n\n", b"\n ", b"\n\t",
                                                                    b"\n\r")):
        return _BLANK_LINE.search(data) is not None
    return False


def read_jsonl_table(data: bytes, columns, numbers=()):
    """The lines of JSONL `data` as one Arrow table of `columns`, row i from line i, read by
    pyarrow's parser (a seventh of json.loads's time per line); None wherever that could differ from
    json.loads line by line (a blank line, a bare carriage return, a byte-order mark, a line
    pyarrow cannot read or reads as two rows, ...): the caller reads those lines one by one.

    Other fields are checked as JSON, not kept. Each column's type is its value's on the first
    line (text for one it lacks; float64 for one in `numbers` unless it is text there), so a
    later value of another type also means None.
    """
    import io

    import pyarrow as pa
    import pyarrow.json as pa_json

    if (not data or len(data) > _MAX_TABLE_BYTES or data.startswith(b"\xef\xbb\xbf")
            or not all(isinstance(name, str) for name in columns)
            or data.count(b"\r") != data.count(b"\r\n") or _has_blank_line(data)):
        return None
    try:
        first = json.loads(data.split(b"\n", 1)[0].decode("utf-8"))
    except Exception:  # not JSON (or nested past Python's recursion limit)
        return None
    if not isinstance(first, dict):
        return None
    fields = []
    for name in dict.fromkeys(columns):
        value = first.get(name)
        if isinstance(value, bool):
            arrow_type = pa.bool_()
        elif name in numbers and (value is None or isinstance(value, (int, float))):
            arrow_type = pa.float64()
        elif value is None or isinstance(value, str):
            arrow_type = pa.string()
        elif isinstance(value, int):
            arrow_type = pa.int64()
        else:  # a float, list or object where text is wanted
            return None
        fields.append(pa.field(name, arrow_type))
    options = pa_json.ReadOptions(use_threads=False, block_size=len(data) + 1)
    parse = pa_json.ParseOptions(explicit_schema=pa.schema(fields),
                                 unexpected_field_behavior="ignore")
    try:
        table = pa_json.read_json(io.BytesIO(data), read_options=options, parse_options=parse)
    except Exception:  # invalid JSON, a changing type, bad UTF-8: json.loads decides per line
        return None
    lines = data.count(b"\n") + (not data.endswith(b"\n"))
    return table if table.num_rows == lines else None


def _is_text(arrow_type) -> bool:
    import pyarrow as pa

    return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)


def text_column(table, name, allow_integers: bool):
    """Column `name` as strings with str()'s digits for integers (all null when absent), or None
    when its type would turn into text differently in Arrow than in Python (floats, booleans,
    structs, ...)."""
    import pyarrow as pa

    if name not in table.column_names:
        return pa.nulls(table.num_rows, pa.string())
    column = table.column(name).combine_chunks()
    if pa.types.is_null(column.type):
        return pa.nulls(table.num_rows, pa.string())
    if _is_text(column.type) or (allow_integers and pa.types.is_integer(column.type)):
        return column.cast(pa.string())
    return None


def _utilities(table, field, caption_column):
    """utility_of each row's `field` as a float64 column (null where it has none)."""
    import numpy as np
    import pyarrow as pa

    from pipeline.labelling import utility_of

    if field == caption_column or field not in table.column_names:  # not in a sample's meta
        return pa.nulls(table.num_rows, pa.float64())
    column = table.column(field).combine_chunks()
    if pa.types.is_integer(column.type) or pa.types.is_floating(column.type):
        values = column.cast(pa.float64()).to_numpy(zero_copy_only=False)
        return pa.array(values, pa.float64(), mask=~np.isfinite(values))
    return pa.array([utility_of({field: value}, field) for value in column.to_pylist()],
                    pa.float64())


def sample_table(table, shard, first_position, key_column, caption_column, utility_field=None):
    """A caption table's rows as samples in columns: (a table of key, shard, position, caption,
    image_id and, with `utility_field`, utility; the quarantine entries of the rows without a key),
    with the key, caption and image_id _row_sample gives each row and the utility utility_of reads;
    None when a column's type would make text differently (float or boolean keys, captions that
    are not text, ...): the caller reads row by row."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipeline.keys import safe_keys

    keys = text_column(table, key_column, allow_integers=True)
    captions = text_column(table, caption_column, allow_integers=False)
    image_ids = text_column(table, "image_id", allow_integers=True)
    if keys is None or captions is None or image_ids is None:
        return None
    positions = pa.array(range(first_position, first_position + table.num_rows), pa.int64())
    keyless = pc.or_kleene(pc.is_null(keys), pc.equal(keys, ""))
    entries = []
    if pc.any(keyless).as_py():
        for i in pc.indices_nonzero(pc.fill_null(keyless, True)).to_pylist():
            position = first_position + i
            entries.append(quarantine.quarantined(quarantine.STAGE_READ, quarantine.MISSING_KEY,
                                                  None, shard, position,
                                                  f"row {position} has no {key_column!r}"))
        keep = pc.invert(pc.fill_null(keyless, True))
        keys, captions, image_ids, positions = (column.filter(keep) for column in (
            keys, captions, image_ids, positions))
        table = table.filter(keep)
    columns = {"key": safe_keys(keys), "shard": pa.array([shard] * len(keys), pa.string()),
               "position": positions, "caption": captions, "image_id": image_ids}
    if utility_field:
        columns["utility"] = _utilities(table, utility_field, caption_column)
    return pa.table(columns), entries


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
