"""Tests of the sources: WebDataset tars, caption tables and COCO JSON, good and broken.

Reader functions are tested directly; planned ranges once inside a real multi-process Beam pipeline.
"""
import hashlib
import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.pvalue import TaggedOutput

from pipeline import quarantine
from pipeline import inputs, sources, table_sources


def _tar_bytes(members):
    """members: [(name, bytes)] or [(TarInfo, bytes|None)] written in order with tarfile."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, data in members:
            info = name if isinstance(name, tarfile.TarInfo) else tarfile.TarInfo(name)
            if data is not None:
                info.size = len(data)
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def _read(iterator):
    samples, entries = [], []
    for output in iterator:
        if isinstance(output, TaggedOutput):
            assert output.tag == quarantine.QUARANTINE_TAG
            entries.append(output.value)
        else:
            samples.append(output)
    return samples, entries


def _read_tar(data, shard="shard.tar"):
    return _read(sources.iter_tar_samples(io.BytesIO(data), shard))


def _three_samples():
    return [(f"k{i}.{ext}", f"{ext}-{i}".encode() * 50) for i in range(3) for ext in ("jpg", "txt")]


def test_tar_samples_keep_every_member_byte_exact():
    members = _three_samples() + [("k2.extra.json", b'{"a": 1}')]
    samples, entries = _read_tar(_tar_bytes(members))
    assert entries == []
    assert [s["key"] for s in samples] == ["k0", "k1", "k2"]
    assert [s["position"] for s in samples] == [0, 1, 2]
    assert samples[2]["members"] == {"jpg": b"jpg-2" * 50, "txt": b"txt-2" * 50,
                                     "extra.json": b'{"a": 1}'}
    assert samples[0]["caption"] == "txt-0" * 50


def test_caption_and_image_id_come_from_json_when_there_is_no_txt():
    meta = {"caption": "A man", "image_id": 7, "url": "http://x"}
    samples, _ = _read_tar(_tar_bytes([("a.jpg", b"x"), ("a.json", json.dumps(meta).encode())]))
    assert samples[0]["caption"] == "A man" and samples[0]["image_id"] == "7"
    assert samples[0]["meta"] == meta


@pytest.mark.parametrize("damage, reason", [
    (lambda data: data[:512 * 4 + 100], quarantine.TRUNCATED_TAR),     # cut inside a member's data
    # at a header
    (lambda data: data[:data.index(b"k2.txt") // 512 * 512], quarantine.TRUNCATED_TAR),
])
def test_truncated_tar_keeps_complete_samples_and_quarantines_the_rest(damage, reason):
    data = _tar_bytes(_three_samples())
    samples, entries = _read_tar(damage(data))
    assert [e["reason"] for e in entries] == [reason]
    complete = {s["key"] for s in samples}
    assert entries[0]["key"] not in complete and len(complete) <= 2


def test_damaged_header_is_quarantined_and_later_members_are_recovered():
    data = bytearray(_tar_bytes(_three_samples()))
    header_k1_jpg = data.index(b"k1.jpg") // 512 * 512
    data[header_k1_jpg + 148] ^= 0x55  # break the header checksum
    samples, entries = _read_tar(bytes(data))
    assert [e["reason"] for e in entries] == [quarantine.CORRUPT_TAR]
    assert [s["key"] for s in samples] == ["k0", "k1", "k2"]
    assert "jpg" not in samples[1]["members"]  # k1 lost its image; the annotator quarantines it


def test_member_names_cannot_escape_and_links_are_not_followed():
    link = tarfile.TarInfo("k1.jpg")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    members = [("../../evil.txt", b"x"), ("/abs.txt", b"x"), ("k0.jpg", b"j"), ("k0.txt", b"t"),
               (link, None)]
    samples, entries = _read_tar(_tar_bytes(members))
    assert sorted(e["reason"] for e in entries) == [
        quarantine.NON_REGULAR_MEMBER, quarantine.UNSAFE_MEMBER_NAME, quarantine.UNSAFE_MEMBER_NAME]
    assert [s["key"] for s in samples] == ["k0"]


def test_bad_text_and_json_members_are_quarantined():
    members = [("a.jpg", b"j"), ("a.txt", b"caf\xe9"), ("b.jpg", b"j"), ("b.json", b"{not json"),
               ("c.jpg", b"j"), ("c.txt", "café".encode())]
    samples, entries = _read_tar(_tar_bytes(members))
    assert [(e["key"], e["reason"]) for e in entries] == [("a", quarantine.NON_UTF8_TEXT),
                                                          ("b", quarantine.BAD_JSON)]
    assert [s["caption"] for s in samples] == ["café"]


@pytest.mark.parametrize("data, reason", [
    (b"", quarantine.EMPTY_SHARD),
    (_tar_bytes([]), quarantine.EMPTY_SHARD),
    (b"this is not a tar file" * 40, quarantine.UNREADABLE_FILE),
])
def test_empty_and_unreadable_shards(data, reason):
    samples, entries = _read_tar(data)
    assert samples == [] and [e["reason"] for e in entries] == [reason]


def test_jsonl_csv_and_parquet_tables(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = b'{"key": "a", "caption": "A man"}\n{"key": "b"}\nnot json\n' \
            b'{"key": "c", "caption": "caf\xe9"}\n[1]\n{"caption": "no key"}\n'
    samples, entries = _read(
        table_sources.iter_jsonl_samples(io.BytesIO(jsonl), "t.jsonl", "key", "caption"))
    assert [(s["key"], s["caption"]) for s in samples] == [("a", "A man"), ("b", None)]
    assert [e["reason"] for e in entries] == [
        quarantine.BAD_JSON, quarantine.NON_UTF8_TEXT, quarantine.BAD_JSON, quarantine.MISSING_KEY
    ]

    csv = b'id,text,score\nx,"A woman, smiling",0.5\ny,caf\xe9,1\nz,too,many,fields\n'
    samples, entries = _read(table_sources.iter_csv_samples(io.BytesIO(csv), "t.csv", "id", "text"))
    assert [(s["key"], s["caption"], s["meta"]["score"]) for s in samples] == [
        ("x", "A woman, smiling", "0.5")]
    assert [e["reason"] for e in entries] == [quarantine.NON_UTF8_TEXT, quarantine.BAD_ROW]

    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"caption": ["A dog", None], "image_id": [1, 2]}), path)
    with open(path, "rb") as handle:
        samples, entries = _read(
            table_sources.iter_parquet_samples(handle, str(path), "key", "caption"))
    # keys.py encodes the dot
    assert entries == [] and [s["key"] for s in samples] == ["t%2Eparquet#0", "t%2Eparquet#1"]
    assert [s["image_id"] for s in samples] == ["1", "2"]


def test_coco_caption_json(shared_data):
    path = shared_data / "coco_mini" / "captions_val2017.json"
    document = json.loads(path.read_text())
    with open(path, "rb") as handle:
        samples, entries = _read(table_sources.iter_coco_samples(handle, str(path)))
    assert entries == [] and len(samples) == len(document["annotations"])
    first = document["annotations"][0]
    assert (samples[0]["key"], samples[0]["caption"], samples[0]["image_id"]) == (
        str(first["id"]), first["caption"], str(first["image_id"])
    )
    _, entries = _read(table_sources.iter_coco_samples(io.BytesIO(b'{"images": []}'), "x.json"))
    assert [e["reason"] for e in entries] == [quarantine.BAD_JSON]


def test_detect_format():
    assert inputs.detect_format("gs://b/x-00001.tar") == sources.FORMAT_WEBDATASET
    assert inputs.detect_format("/d/x.tar.gz") == sources.FORMAT_WEBDATASET
    assert inputs.detect_format("x.JSONL") == sources.FORMAT_JSONL
    assert inputs.detect_format("captions.json") == sources.FORMAT_COCO
    assert inputs.detect_format("x.txt") is None


def test_planned_ranges_read_in_another_pipeline_are_byte_exact(coco_mini_shards, tmp_path):
    """What annotate and resample rely on: PlanRanges + ReadRangeBatches in any pipeline, members
    byte for byte, each file once even when two globs match it."""
    import apache_beam as beam
    from pipeline import splits
    from pipeline.options import pipeline_options

    out = tmp_path / "digests"
    options = pipeline_options(["--direct_running_mode=multi_processing", "--direct_num_workers=2"])
    with beam.Pipeline(options=options) as pipeline:
        read = (pipeline
                | splits.PlanRanges([coco_mini_shards.glob, coco_mini_shards.glob])
                | beam.ParDo(splits.ReadRangeBatches()).with_outputs("quarantine", "counts",
                                                                     main="batches"))
        (read.batches
         | beam.FlatMap(lambda batch: [
             json.dumps([
                 s["key"], s["shard"],
                 {ext: hashlib.sha256(data).hexdigest()
                  for ext, data in s["members"].items()}
             ]) for s in batch
         ])
         | beam.io.WriteToText(str(out)))
        read.quarantine | "Quarantine" >> beam.io.WriteToText(str(tmp_path / "quarantine"))
    lines = [
        json.loads(line) for path in tmp_path.glob("digests*")
        for line in path.read_text().splitlines()
    ]
    expected = {r["key"]: (r["shard"], hashlib.sha256(r["jpg"]).hexdigest(),
                           hashlib.sha256(r["caption"].encode()).hexdigest())
                for r in coco_mini_shards.records}
    assert len(lines) == len(expected)  # the glob given twice still reads every file once
    for key, shard, digests in lines:
        assert (shard, digests["jpg"], digests["txt"]) == expected[key]
        assert set(digests) == {"jpg", "txt", "json"}
    assert all(path.read_text() == "" for path in tmp_path.glob("quarantine*"))


@pytest.mark.parametrize("range_bytes", [700, 4096, 50_000])
def test_a_jsonl_file_cut_in_ranges_reads_like_the_whole_file(tmp_path, monkeypatch, range_bytes):
    """Records, their positions and quarantine entries are the same however the file is cut."""
    from pipeline import splits

    lines = []
    for i in range(3000):
        if i % 701 == 3:
            lines.append("{not json")
        elif i % 997 == 5:
            lines.append("")
        else:
            lines.append(json.dumps({"key": f"k{i}", "caption": "a man " * (i % 17)}))
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(lines))  # no newline after the last line

    def flat(records):
        return [(r.value["position"], r.value["reason"]) if hasattr(r, "tag")
                else (r["position"], r["key"]) for r in records]

    whole = flat(inputs.iter_file_records(str(path)))
    monkeypatch.setattr(splits, "RANGE_BYTES", range_bytes)
    ranges = splits.plan_ranges(str(path))
    assert len(ranges) > 1
    assert [r["index"] for r in ranges] == list(range(len(ranges)))
    assert [x for r in ranges for x in flat(splits.iter_range_records(r))] == whole
    assert [p for p, _ in whole] == list(range(3000))


def test_a_parquet_file_is_cut_at_row_groups(tmp_path, monkeypatch):
    from pipeline import splits

    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"key": [f"k{i}" for i in range(1000)], "caption": ["a woman"] * 1000}),
                   path, row_group_size=150)
    monkeypatch.setattr(splits, "PARQUET_RANGE_ROWS", 300)
    ranges = splits.plan_ranges(str(path))
    assert [(r["start"], r["end"], r["first_position"]) for r in ranges] == [(0, 2, 0), (2, 4, 300),
                                                                             (4, 6, 600),
                                                                             (6, 7, 900)]
    records = [r for rng in ranges for r in splits.iter_range_records(rng)]
    assert [(r["position"], r["key"]) for r in records] == [(i, f"k{i}") for i in range(1000)]
