"""Reading image-text samples for the Beam jobs: WebDataset tars, caption tables, COCO caption JSON.

Plain iterators, one per format, that yield samples and TaggedOutput quarantine entries for what
cannot be read; pipeline/inputs.py picks a file's reader (and a table's columns), and
pipeline/splits.py cuts files into ranges and runs them in Beam.
"""
import csv
import json
import pathlib
import posixpath
import re
import tarfile

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from pipeline import quarantine
from pipeline.keys import safe_key

FORMAT_AUTO = "auto"
FORMAT_WEBDATASET = "webdataset"
FORMAT_PARQUET = "parquet"
FORMAT_JSONL = "jsonl"
FORMAT_CSV = "csv"
FORMAT_COCO = "coco"
FORMATS = (FORMAT_AUTO, FORMAT_WEBDATASET, FORMAT_PARQUET, FORMAT_JSONL, FORMAT_CSV, FORMAT_COCO)

# img2dataset names a sample's members KEY.EXT; webdataset splits them with this pattern
# (webdataset/tariterators.py, base_plus_ext): the key is everything up to the basename's first dot.
_KEY_AND_EXTENSION = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTENSION = "txt"
JSON_EXTENSION = "json"
TAR_BLOCK = 512
# A well-formed tar ends with two zero blocks (POSIX.1-1988 end-of-archive marker).
END_OF_ARCHIVE_BYTES = 2 * TAR_BLOCK
# Members larger than this are not read into memory (a web image is a few hundred kB; this leaves
# room for large PNGs and precomputed embeddings while stopping a forged 10 GB header).
MAX_MEMBER_BYTES = 256 * 1024 * 1024
TABLE_BATCH_ROWS = 1024
# Largest CSV cell read (csv's own default is 128 KiB); a larger one makes its row a bad_row.
MAX_CSV_FIELD = 16 * 1024 * 1024


def _sample(key, shard, position, caption=None, members=None, meta=None, image_id=None):
    return {"key": key, "shard": shard, "position": position, "caption": caption,
            "members": members or {}, "meta": meta or {}, "image_id": image_id}


class _TailTrackingReader:
    """File wrapper that remembers the bytes read and the last few, to check the end-of-archive."""

    def __init__(self, raw):
        self.raw, self.bytes_read, self.tail = raw, 0, b""

    def read(self, size=-1):
        data = self.raw.read(size)
        self.bytes_read += len(data)
        self.tail = (self.tail + data)[-END_OF_ARCHIVE_BYTES:]
        return data

    def drain(self):
        while self.read(1 << 20):
            pass

    def ends_with_marker(self):
        return len(self.tail) == END_OF_ARCHIVE_BYTES and not self.tail.strip(b"\0")


def _is_unsafe_member_name(name):
    parts = pathlib.PurePosixPath(name).parts
    return name.startswith(("/", "\\")) or ".." in parts or "\\" in name or "\0" in name


def iter_tar_samples(raw_file, shard, caption_field="caption"):
    """Yields samples or quarantine entries (TaggedOutput) from one tar, streaming member by member.

    Members are never written to disk, so their names cannot escape anywhere; names that try
    (absolute, "..") are quarantined all the same. A sample's members are kept byte-exact.
    """
    reader = _TailTrackingReader(raw_file)
    pending, position, expected_offset, members_seen = None, 0, 0, 0
    try:
        # ignore_zeros lets tarfile resynchronise after a damaged header; the offset check below
        # turns every skipped stretch into a quarantine entry instead of losing it silently.
        with tarfile.open(fileobj=reader, mode="r|", ignore_zeros=True) as archive:
            for member in archive:
                if member.offset != expected_offset:
                    yield quarantine.quarantined(
                        quarantine.STAGE_READ, quarantine.CORRUPT_TAR, None, shard, None,
                        f"{member.offset - expected_offset} bytes of damaged tar "
                        f"headers skipped before member {member.name!r}")
                expected_offset = member.offset_data + -(-member.size // TAR_BLOCK) * TAR_BLOCK
                members_seen += 1
                if member.isdir():
                    continue
                name = member.name
                if _is_unsafe_member_name(name):
                    yield quarantine.quarantined(quarantine.STAGE_READ,
                                                 quarantine.UNSAFE_MEMBER_NAME, None, shard, None,
                                                 name)
                    continue
                if not member.isfile():
                    yield quarantine.quarantined(quarantine.STAGE_READ,
                                                 quarantine.NON_REGULAR_MEMBER, None, shard, None,
                                                 name)
                    continue
                match = _KEY_AND_EXTENSION.match(name)
                if match is None:
                    yield quarantine.quarantined(quarantine.STAGE_READ, quarantine.BAD_ROW, None,
                                                 shard, None,
                                                 f"member {name!r} has no KEY.EXT name")
                    continue
                key, extension = match.groups()
                if member.size > MAX_MEMBER_BYTES:
                    yield quarantine.quarantined(
                        quarantine.STAGE_READ, quarantine.BAD_ROW, key, shard, None,
                        f"member {name!r} has {member.size} bytes (limit {MAX_MEMBER_BYTES})")
                    continue
                # Same rule as webdataset's group_by_keys: a new key, or an extension seen again,
                # starts a new sample; the finished one goes out before this member is read.
                if pending is None or pending[0] != key or extension in pending[1]:
                    if pending is not None:
                        yield from _finish_tar_sample(pending, shard, caption_field)
                        position += 1
                    pending = (key, {}, position)
                pending[1][extension] = archive.extractfile(member).read()
        reader.drain()
    except (tarfile.TarError, EOFError, OSError) as error:
        key = pending[0] if pending else None
        reason = quarantine.TRUNCATED_TAR if members_seen else quarantine.UNREADABLE_FILE
        if reader.bytes_read == 0:
            reason = quarantine.EMPTY_SHARD
        yield quarantine.quarantined(quarantine.STAGE_READ, reason, key, shard,
                                     pending[2] if pending else None,
                                     f"tar stopped after {reader.bytes_read} bytes: {error}")
        return
    if not reader.ends_with_marker():
        reason = quarantine.TRUNCATED_TAR if members_seen else quarantine.UNREADABLE_FILE
        if reader.bytes_read == 0:
            reason = quarantine.EMPTY_SHARD
        yield quarantine.quarantined(quarantine.STAGE_READ, reason, pending[0] if pending else None,
                                     shard, pending[2] if pending else None,
                                     f"no end-of-archive marker after {reader.bytes_read} bytes")
        return
    if pending is not None:
        yield from _finish_tar_sample(pending, shard, caption_field)
    elif not members_seen:
        yield quarantine.quarantined(quarantine.STAGE_READ, quarantine.EMPTY_SHARD, None, shard,
                                     None, "tar has no members")


def _member(members, extension):
    for name, data in members.items():
        if name.lower() == extension:
            return data
    return None


def _finish_tar_sample(pending, shard, caption_field):
    key, members, position = pending
    meta = {}
    json_bytes = _member(members, JSON_EXTENSION)
    caption = None
    try:
        if json_bytes is not None:
            meta = json.loads(json_bytes.decode("utf-8"))
            if not isinstance(meta, dict):
                raise ValueError(f"json member is a {type(meta).__name__}, not an object")
        text_bytes = _member(members, TEXT_EXTENSION)
        if text_bytes is not None:
            caption = text_bytes.decode("utf-8")
    except UnicodeDecodeError as error:
        yield quarantine.quarantined(quarantine.STAGE_READ, quarantine.NON_UTF8_TEXT, key, shard,
                                     position, error)
        return
    except ValueError as error:
        yield quarantine.quarantined(quarantine.STAGE_READ, quarantine.BAD_JSON, key, shard,
                                     position, error)
        return
    if caption is None and isinstance(meta.get(caption_field), str):
        caption = meta[caption_field]
    dotted = sorted(name for name in members if "." in name)
    if caption is None and dotted:
        yield quarantine.quarantined(
            quarantine.STAGE_READ, quarantine.INVALID_KEY, key, shard, position,
            f"members {', '.join(f'{key}.{name}' for name in dotted)}: WebDataset reads {key!r} as "
            f"the key and {dotted[0]!r} as the extension; a key must not contain '.'")
        return
    image_id = meta.get("image_id")
    yield _sample(key, shard, position, caption, members, meta,
                  None if image_id is None else str(image_id))


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
    return _sample(key, shard, position, caption, None, meta,
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
            sample = _row_sample(row, shard, position, key_column, caption_column, has_key_column)
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
        yield _sample(safe_key(str(annotation["id"])), shard, position,
                      caption if isinstance(caption, str) else None, None, meta,
                      None if image_id is None else str(image_id))


# Column names tried in order when --caption-column / --key-column are not given: balancebeam's
# own, then DataComp's and img2dataset's metadata (`text` and `uid` in DataComp's Parquet).
