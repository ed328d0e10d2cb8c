"""Which input files, which columns, which reader: the jobs' entry into pipeline/sources.py.

`MatchInputFiles` expands the input globs in Beam; `resolve_columns` finds a caption table's key
and caption columns (the names given, else the first of KEY_COLUMNS / CAPTION_COLUMNS each
table has) before any job starts; `iter_file_records` runs the reader of one file's format,
whatever it is.
"""
from __future__ import annotations

import csv
import json
import os

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems

from pipeline import quarantine
from pipeline.sources import (FORMAT_AUTO, FORMAT_COCO, FORMAT_CSV, FORMAT_JSONL, FORMAT_PARQUET,
                              FORMAT_WEBDATASET, iter_tar_samples)
from pipeline.table_sources import (iter_coco_samples, iter_csv_samples, iter_jsonl_samples,
                                    iter_parquet_samples)

_FORMAT_BY_SUFFIX = {".tar": FORMAT_WEBDATASET, ".parquet": FORMAT_PARQUET, ".jsonl": FORMAT_JSONL,
                     ".ndjson": FORMAT_JSONL, ".csv": FORMAT_CSV, ".json": FORMAT_COCO}
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".zst", ".deflate", ".lzma")


def detect_format(path):
    """Input format of one file from its name: .tar, .parquet, .jsonl/.ndjson, .csv, .json (COCO).
    """
    name = path.lower()
    for suffix in _COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            name = name[:-len(suffix)]
    for suffix, file_format in _FORMAT_BY_SUFFIX.items():
        if name.endswith(suffix):
            return file_format
    return None

CAPTION_COLUMNS = ("caption", "text")
KEY_COLUMNS = ("key", "uid")
_TABLE_FORMATS = (FORMAT_PARQUET, FORMAT_JSONL, FORMAT_CSV)


def table_columns(path: str, input_format: str = FORMAT_AUTO):
    """The column names of a caption table (Parquet schema, a JSONL file's first object, a CSV
    header), or None for the other formats and for a file whose first record cannot be read (its
    reader will quarantine it with the reason)."""
    file_format = detect_format(path) if input_format == FORMAT_AUTO else input_format
    if file_format not in _TABLE_FORMATS:
        return None
    try:
        with FileSystems.open(path) as raw_file:
            if file_format == FORMAT_PARQUET:
                import pyarrow.parquet as pq

                return list(pq.ParquetFile(raw_file).schema_arrow.names)
            first = raw_file.readline()
            if file_format == FORMAT_JSONL:
                row = json.loads(first.decode("utf-8"))
                return list(row) if isinstance(row, dict) else None
            return next(csv.reader([first.decode("utf-8")]), None)
    except Exception:  # unreadable here: the job's reader quarantines it with the reason
        return None


def resolve_columns(paths, input_format=FORMAT_AUTO, key_column=None, caption_column=None):
    """(key column, caption column) for reading `paths`: the ones given, or the first of KEY_COLUMNS
    / CAPTION_COLUMNS each table has. Raises ValueError, naming the columns found, when a table
    lacks the caption column or a key column that was asked for by name (a table with no key column
    at all is keyed FILE#ROW), and when two tables would be read by different columns."""
    resolved = {}
    for path in paths:
        columns = table_columns(path, input_format)
        if columns is None:
            continue
        caption = caption_column or next((c for c in CAPTION_COLUMNS if c in columns), None)
        key = key_column or next((c for c in KEY_COLUMNS if c in columns), KEY_COLUMNS[0])
        found = ", ".join(map(repr, columns[:30])) + (", ..." if len(columns) > 30 else "")
        if caption is None or caption not in columns:
            asked = (f"--caption-column {caption!r}" if caption
                     else f"caption column ({' or '.join(CAPTION_COLUMNS)})")
            raise ValueError(
                f"{path} has no {asked}; its columns are {found}: pass --caption-column NAME")
        if key_column and key_column not in columns:
            raise ValueError(f"{path} has no --key-column {key_column!r}; its columns are {found}")
        resolved[path] = (key, caption)
    if not resolved:
        return key_column or KEY_COLUMNS[0], caption_column or CAPTION_COLUMNS[0]
    (first_path, first), *others = resolved.items()
    for path, pair in others:
        if pair != first:
            raise ValueError(
                f"{first_path} would be read by key and caption columns {first} but {path} by "
                f"{pair}: pass --key-column and --caption-column")
    return first


def normalize_path(path: str) -> str:
    """A local path made absolute (object-store URLs as they are): annotate records where each
    record came from, and resample finds it again by that name whatever the working directory."""
    if FileSystems.get_scheme(path) is None:
        return os.path.abspath(path)
    return path


def iter_file_records(path, input_format=FORMAT_AUTO, key_column="key", caption_column="caption",
                      embeddings_field=None, columns=None):
    """Samples of one input file, and TaggedOutput quarantine entries for what cannot be read.

    columns: of a Parquet table, read only these (besides key, caption and embedding); None: all.
    """
    file_format = detect_format(path) if input_format == FORMAT_AUTO else input_format
    if file_format is None:
        yield quarantine.quarantined(quarantine.STAGE_READ, quarantine.UNREADABLE_FILE, None, path,
                                     None, "unknown file type; pass --input-format")
        return
    try:
        with FileSystems.open(path) as raw_file:
            if file_format == FORMAT_WEBDATASET:
                yield from iter_tar_samples(raw_file, path, caption_column)
            elif file_format == FORMAT_PARQUET:
                yield from iter_parquet_samples(raw_file, path, key_column, caption_column,
                                                embeddings_field=embeddings_field, columns=columns)
            elif file_format == FORMAT_JSONL:
                yield from iter_jsonl_samples(raw_file, path, key_column, caption_column)
            elif file_format == FORMAT_CSV:
                yield from iter_csv_samples(raw_file, path, key_column, caption_column)
            else:
                yield from iter_coco_samples(raw_file, path)
    except Exception as error:  # a file we cannot open or parse at all: quarantine, go on
        yield quarantine.quarantined(quarantine.STAGE_READ, quarantine.UNREADABLE_FILE, None, path,
                                     None, f"{type(error).__name__}: {error}")


class MatchInputFiles(beam.PTransform):
    """Globs -> the distinct (normalised) paths they match, spread over the workers."""

    def __init__(self, globs):
        super().__init__()
        self.globs = [globs] if isinstance(globs, str) else list(globs)

    def expand(self, pbegin):
        return (pbegin
                | "Globs" >> beam.Create(self.globs)
                | "MatchFiles" >> fileio.MatchAll()
                | "Paths" >> beam.Map(lambda metadata: normalize_path(metadata.path))
                # Distinct groups by path, which also spreads the files over the workers.
                | "SpreadFiles" >> beam.Distinct())
