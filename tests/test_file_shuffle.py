"""GroupTablesByFile: a group-by-bucket whose rows travel as Arrow files, on a real runner."""
import collections
import pathlib

import apache_beam as beam
import pyarrow as pa
import pytest

from pipeline import file_shuffle
from pipeline.errors import DataError
from pipeline.options import pipeline_options


def _parts(count):
    """(bucket, table) parts: rows i of bucket i % 7, in tables of 13 rows."""
    rows = [(i % 7, f"k{i:05d}", i) for i in range(count)]
    for start in range(0, count, 13):
        chunk = rows[start:start + 13]
        by_bucket = collections.defaultdict(list)
        for bucket, key, value in chunk:
            by_bucket[bucket].append((key, value))
        for bucket, pairs in by_bucket.items():
            yield bucket, pa.table({"key": [k for k, _ in pairs], "value": [v for _, v in pairs]})


@pytest.mark.parametrize("mode,flush_rows", [("multi_processing", 50), ("in_memory", 10_000)])
def test_every_row_reaches_its_bucket_once_through_files(tmp_path, mode, flush_rows):
    spill = tmp_path / "spill"
    spill.mkdir()
    out = tmp_path / "out.txt"
    options = pipeline_options(["--direct_running_mode", mode, "--direct_num_workers", "2"])
    with beam.Pipeline(options=options) as pipeline:
        _ = (
            pipeline
            | beam.Create(list(_parts(2000)))
            | beam.Reshuffle()
            | file_shuffle.GroupTablesByFile(str(spill), flush_rows=flush_rows)
            | beam.FlatMap(
                lambda bucket_table: [
                    f"{bucket_table[0]} {k} {v}"
                    for k, v in zip(
                        bucket_table[1].column("key").to_pylist(),
                        bucket_table[1].column("value").to_pylist(),
                    )
                ]
            )
            | beam.io.WriteToText(str(out), shard_name_template="")
        )
    lines = out.read_text().split()
    got = sorted(tuple(lines[i : i + 3]) for i in range(0, len(lines), 3))
    assert got == sorted((str(i % 7), f"k{i:05d}", str(i)) for i in range(2000))
    files = list(spill.glob(file_shuffle.SPILL_FILE_PREFIX + "*.arrow"))
    assert files and all(path.stat().st_size for path in files)
    if flush_rows == 50:  # workers flushed as they went, not once per bundle
        assert len(files) > 2000 // 50 // 2


def test_a_spill_file_that_changed_under_the_job_stops_it(tmp_path):
    spiller = file_shuffle.SpillParts(str(tmp_path), flush_rows=10**9)
    spiller.start_bundle()
    for part in _parts(100):
        assert list(spiller.process(part)) == []
    references = [value.value for value in spiller.finish_bundle()]
    assert sorted(bucket for bucket, _ in references) == list(range(7))
    bucket, reference = references[0]
    _, table = file_shuffle.read_bucket((bucket, [reference]))
    assert table.column("value").to_pylist() == [i for i in range(100) if i % 7 == bucket]
    path, first, count, rows = reference
    with pytest.raises(DataError, match="changed under it"):
        file_shuffle.read_bucket((bucket, [(path, first, count, rows + 1)]))
    pathlib.Path(path).write_bytes(b"not arrow")
    with pytest.raises(pa.ArrowInvalid):
        file_shuffle.read_bucket((bucket, [reference]))


def test_parts_by_bucket_keeps_every_row_once_in_table_order():
    table = pa.table({"value": list(range(50))})
    buckets = [(i * 7) % 5 for i in range(50)]
    parts = list(file_shuffle.parts_by_bucket(table, buckets))
    assert [bucket for bucket, _ in parts] == sorted(set(buckets))
    for bucket, part in parts:
        assert part.column("value").to_pylist() == [i for i in range(50) if buckets[i] == bucket]
    assert list(file_shuffle.parts_by_bucket(table.slice(0, 0), [])) == []


def test_a_worker_flushes_by_bytes_as_well_as_rows(tmp_path):
    """Parts that carry payloads (resample's inline members) are written out once they hold
    flush_bytes, however few their rows: a worker's buffer stays bounded."""
    payload = pa.table({"data": [b"x" * 1000] * 10})
    spiller = file_shuffle.SpillParts(str(tmp_path), flush_rows=10**9,
                                      flush_bytes=3 * payload.nbytes)
    spiller.start_bundle()
    flushed = [list(spiller.process((i % 2, payload))) for i in range(7)]
    assert [len(refs) for refs in flushed] == [0, 0, 2, 0, 0, 2, 0]
    references = flushed[2] + flushed[5] + [value.value for value in spiller.finish_bundle()]
    assert sum(rows for _, (_, _, _, rows) in references) == 70
    for bucket in (0, 1):
        _, table = file_shuffle.read_bucket((bucket, [ref for b, ref in references if b == bucket]))
        assert table.num_rows == (40 if bucket == 0 else 30)
