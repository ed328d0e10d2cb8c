"""dedup.DropDuplicateRows on its own: a written annotations file loses exactly the rows at the
duplicate places, row group by row group, and reports what it took out as negative counts."""
import collections

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import dedup
from pipeline.records import ANNOTATION_SCHEMA

MAN, WOMAN = "perceived_gender:man", "perceived_gender:woman"


def _rows(n):
    return [{"key": f"k{i % 40}", "shard": f"s{i % 3}", "position": i, "caption": f"caption {i}",
             "image_id": None, "attributes": [[MAN], [WOMAN], []][i % 3],
             "concepts": ["kitchen"] if i % 5 == 0 else [], "utility": None, "evidence": "{}"}
            for i in range(n)]


def _counts_of(outputs):
    return [output.value for output in outputs]


def test_only_the_rows_at_duplicate_places_leave_a_file_of_several_row_groups(tmp_path):
    rows = _rows(100)
    path = tmp_path / "annotations-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=ANNOTATION_SCHEMA), path, row_group_size=16)
    assert pq.ParquetFile(path).metadata.num_row_groups == 7
    places = {("s1", 1), ("s0", 48), ("s2", 98), ("s0", 999)}  # the last is in no row of this file
    spill = tmp_path / "spill"
    spill.mkdir()
    counts = _counts_of(dedup.DropDuplicateRows(str(spill)).process(str(path), places))

    left = pq.read_table(path).to_pylist()
    assert [row["position"] for row in left] == [
        row["position"] for row in rows if (row["shard"], row["position"]) not in places]
    gone = [row for row in rows if (row["shard"], row["position"]) in places]
    assert len(gone) == 3
    assert len(counts) == 1 and counts[0]["annotated"] == -3
    expected = collections.Counter(dedup.label_set(r["attributes"], r["concepts"], None)
                                   for r in gone)
    assert counts[0]["label_sets"] == {text: -n for text, n in expected.items()}
    assert list(spill.iterdir()) == []  # the rewrite was renamed over the file


def test_a_file_without_duplicates_is_left_alone(tmp_path):
    path = tmp_path / "annotations.parquet"
    pq.write_table(pa.Table.from_pylist(_rows(20), schema=ANNOTATION_SCHEMA), path)
    before = path.read_bytes()
    fn = dedup.DropDuplicateRows(str(tmp_path))
    assert list(fn.process(str(path), set())) == []
    assert list(fn.process(str(path), {("s9", 0)})) == []
    assert path.read_bytes() == before


def test_later_copies_leave_a_two_worker_job_at_20k_rows(shared_data, tmp_path, capsys):
    """bench/duplicates.py (a million rows there) at CI's size: later copies of 200 keys among
    20,000 caption rows, annotated by two workers; its checks read only the files written."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench import duplicates

    assert duplicates.main(["--rows", "20000", "--duplicates", "200", "--runs", "1",
                            "--work", str(tmp_path)]) == 0
    assert "| 1 |" in capsys.readouterr().out
