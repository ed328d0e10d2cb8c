"""Files written per bundle and named by the driver (pipeline/bundle_files.py), and the counts that
list them (pipeline/counts.py), on the multi-process DirectRunner."""
import collections
import json
import sys

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.internal.cloudpickle import cloudpickle
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import annotate, quarantine
from pipeline.bundle_files import WriteQuarantineLines, WriteTables, publish
from pipeline.counts import COUNTS_TAG, AddCounts, counted, read_total
from pipeline.options import pipeline_options
from pipeline.records import ANNOTATION_SCHEMA

# the workers cannot import this test module: its functions travel by value
cloudpickle.register_pickle_by_value(sys.modules[__name__])
TWO_WORKERS = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]
REASONS = (quarantine.BAD_JSON, quarantine.EMPTY_CAPTION, quarantine.MISSING_IMAGE)


def _table(first, rows):
    keys = [f"k{i:05d}" for i in range(first, first + rows)]
    return pa.table({
        "key": keys, "shard": ["s.tar"] * rows, "position": list(range(first, first + rows)),
        "caption": [f"caption {k}" for k in keys], "image_id": [None] * rows,
        "attributes": [["perceived_gender:man"] if i % 3 else [] for i in range(rows)],
        "concepts": [[] for _ in range(rows)], "utility": [None] * rows,
        "evidence": [None] * rows}, schema=ANNOTATION_SCHEMA)


def _entry(i):
    return {"key": f"bad{i}", "shard": "s.tar", "position": i, "stage": "read",
            "reason": REASONS[i % len(REASONS)], "detail": f"détail {i}"}


def _write_json(payload, path):
    path.write_text(json.dumps(payload))


def test_bundles_write_each_record_once_and_the_driver_publishes_exactly_the_listed_files(
        tmp_path):
    spill = tmp_path / "spill"
    spill.mkdir()
    stray = spill / "bundle-0000stray.parquet"  # a failed attempt's file: listed nowhere
    pq.write_table(_table(90_000, 5), stray)
    sizes = [40, 1, 250, 7, 120, 33, 64, 5]  # tables of uneven size, spread over the workers
    firsts = [sum(sizes[:i]) for i in range(len(sizes))]
    entries = [_entry(i) for i in range(23)]
    pipeline = beam.Pipeline(options=pipeline_options(TWO_WORKERS))
    written = (pipeline
               | "Tables" >> beam.Create(list(zip(firsts, sizes)))
               | "Make" >> beam.MapTuple(_table)
               | "Write" >> beam.ParDo(WriteTables(str(spill), ANNOTATION_SCHEMA, "tables"))
               .with_outputs(COUNTS_TAG, main="paths"))
    lines = (pipeline | "Entries" >> beam.Create(entries)
             | "WriteLines" >> beam.ParDo(WriteQuarantineLines(str(spill), "lines")))
    _ = ((written[COUNTS_TAG], lines) | AddCounts()
         | beam.Map(_write_json, tmp_path / "counts.json"))
    result = pipeline.run()
    result.wait_until_finish()
    # Beam's counter of quarantined entries counts where an entry is made, not again here
    assert not result.metrics().query(MetricsFilter().with_name("quarantined"))["counters"]
    counts = read_total(str(tmp_path / "counts.json"))
    assert counts["quarantined"] == len(entries)
    assert counts["quarantined_by_reason"] == dict(collections.Counter(e["reason"]
                                                                       for e in entries))
    assert sum(counts["tables"].values()) == sum(sizes)
    assert str(stray) not in counts["tables"]

    names = publish(counts["tables"], str(tmp_path / "annotations"), ".parquet")
    files = sorted(tmp_path.glob("annotations-*.parquet"))
    assert [str(p) for p in files] == names
    assert [p.name for p in files] == [f"annotations-{i:05d}-of-{len(files):05d}.parquet"
                                       for i in range(len(files))]
    table = pa.concat_tables(pq.read_table(p, schema=ANNOTATION_SCHEMA) for p in files)
    expected = pa.concat_tables(_table(f, n) for f, n in zip(firsts, sizes))
    assert table.sort_by("key").equals(expected.sort_by("key"))
    # each table one row group, as Beam's Parquet sink writes them
    assert sum(pq.ParquetFile(p).metadata.num_row_groups for p in files) == len(sizes)

    published = publish(counts["lines"], str(tmp_path / "quarantine"), ".jsonl")
    got = [line for path in published for line in open(path, encoding="utf-8")]
    assert sorted(got) == sorted(json.dumps(e, sort_keys=True, ensure_ascii=False) + "\n"
                                 for e in entries)
    assert [p for p in spill.iterdir()] == [stray]  # the unlisted file stays where it was


def test_counts_add_up_over_workers_and_bundles_and_nothing_counted_writes_nothing(tmp_path):
    def step(n):
        yield n
        yield counted({"records_read": n, "by_reason": {f"r{n % 4}": 1}})

    with beam.Pipeline(options=pipeline_options(TWO_WORKERS)) as pipeline:
        made = [pipeline | f"Input{i}" >> beam.Create(values)
                | f"Step{i}" >> beam.FlatMap(step).with_outputs(COUNTS_TAG, main="n")
                for i, values in enumerate((range(300), range(1000, 1010), []))]
        _ = (tuple(m[COUNTS_TAG] for m in made) | "Add" >> AddCounts()
             | "Write" >> beam.Map(_write_json, tmp_path / "total.json"))
        _ = ((made[2][COUNTS_TAG],) | "AddNone" >> AddCounts()
             | "WriteNone" >> beam.Map(_write_json, tmp_path / "none.json"))
    values = [*range(300), *range(1000, 1010)]
    assert read_total(str(tmp_path / "total.json")) == {
        "records_read": sum(values),
        "by_reason": dict(collections.Counter(f"r{n % 4}" for n in values))}
    assert not (tmp_path / "none.json").exists()
    assert read_total(str(tmp_path / "none.json")) == {}


def test_annotate_leaves_one_empty_file_of_each_kind_it_wrote_nothing_of(tmp_path):
    everything_bad = tmp_path / "bad.jsonl"
    everything_bad.write_text("".join(json.dumps({"key": f"k{i}", "caption": ""}) + "\n"
                                      for i in range(5)))
    annotate.run(["--input", str(everything_bad), "--output", str(tmp_path / "bad"), *TWO_WORKERS])
    counts = annotate.read_counts(tmp_path / "bad")
    assert (counts["annotated"], counts["quarantined"]) == (0, 5)
    empty = pq.read_table(tmp_path / "bad" / "annotations-00000-of-00001.parquet")
    assert empty.num_rows == 0 and empty.schema.names == ANNOTATION_SCHEMA.names
    assert [p.name for p in (tmp_path / "bad").glob("annotations-*")] == [
        "annotations-00000-of-00001.parquet"]

    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"key": f"k{i}", "caption": "a woman with a dog"}) + "\n"
                            for i in range(5)))
    annotate.run(["--input", str(good), "--output", str(tmp_path / "good"), *TWO_WORKERS])
    assert annotate.read_counts(tmp_path / "good")["annotated"] == 5
    assert [(p.name, p.read_text()) for p in (tmp_path / "good").glob("quarantine-*")] == [
        ("quarantine-00000-of-00001.jsonl", "")]
    assert not (tmp_path / "good" / ".spill").exists()
