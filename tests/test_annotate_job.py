"""End-to-end tests of the annotate job on real runners: multi-process DirectRunner and the
portable runner against a local job service, on real COCO data and on deliberately broken input.
"""
import collections
import io
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import annotate, cli
from pipeline import quarantine
from pipeline.annotators.text import annotate_caption
from pipeline.splits import ReadRangeBatches

TWO_WORKERS = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]
MAN, WOMAN = "perceived_gender:man", "perceived_gender:woman"


def _run_job(input_globs, output, *extra):
    argv = [arg for pattern in input_globs for arg in ("--input", str(pattern))]
    annotate.run(argv + ["--output", str(output), *extra])
    return annotate.read_annotations(output), annotate.read_counts(output)


def _quarantine_entries(output):
    return [json.loads(line) for path in sorted(output.glob("quarantine-*.jsonl"))
            for line in path.read_text().splitlines()]


# --- real data: coco_mini shards ------------------------------------------------------------

@pytest.fixture(scope="module")
def coco_mini_job(coco_mini_shards, tmp_path_factory):
    output = tmp_path_factory.mktemp("annotate_coco_mini")
    return (output, *_run_job([coco_mini_shards.glob], output, *TWO_WORKERS))


def test_coco_mini_every_sample_annotated_with_its_own_caption(coco_mini_job, coco_mini_shards):
    output, table, counts = coco_mini_job
    assert counts == {
        "records_read": 159, "annotated": 159, "quarantined": 0, "quarantined_by_reason": {},
        "utility_missing": 0,
        "read_options": {"input_format": "auto", "key_column": "key", "caption_column": "caption"}
    }
    assert table.schema.equals(annotate.ANNOTATION_SCHEMA)
    rows = {row["key"]: row for row in table.to_pylist()}
    for record in coco_mini_shards.records:
        row = rows[record["key"]]
        assert (row["shard"], row["caption"], row["image_id"]) == (
            record["shard"], record["caption"], record["image_id"])
        attributes, concepts, evidence = annotate_caption(record["caption"])
        assert (row["attributes"], row["concepts"]) == (attributes, concepts)
        assert json.loads(row["evidence"]) == evidence
    assert _quarantine_entries(output) == []


def test_coco_mini_annotations_agree_with_coco_instance_labels(coco_mini_job, shared_data):
    """Independent ground truth: COCO's boxes. Gendered captions show a person; caption concepts
    that are COCO categories are mostly boxed in the image."""
    _, table, _ = coco_mini_job
    boxed = {}
    for split in ("train2017", "val2017"):
        document = json.loads((shared_data / "coco_mini" / f"instances_{split}.json").read_text())
        names = {c["id"]: c["name"] for c in document["categories"]}
        for box in document["annotations"]:
            boxed.setdefault(str(box["image_id"]), set()).add(names[box["category_id"]])
    categories = set(names.values())
    gendered = [row for row in table.to_pylist() if row["attributes"]]
    assert len(gendered) >= 20
    assert all("person" in boxed.get(row["image_id"], ()) for row in gendered)
    hits = [(concept in boxed.get(row["image_id"], ())) for row in table.to_pylist()
            for concept in row["concepts"] if concept in categories]
    assert len(hits) >= 100 and sum(hits) / len(hits) >= 0.9


def test_portable_runner_on_a_local_job_service_gives_the_same_annotations(
        coco_mini_job, coco_mini_shards, tmp_path, job_service):
    table, counts = _run_job([coco_mini_shards.glob], tmp_path / "out", "--runner=PortableRunner",
                             f"--job_endpoint=localhost:{job_service}",
                             "--environment_type=LOOPBACK")
    _, direct_table, direct_counts = coco_mini_job
    assert counts == direct_counts
    assert table.equals(direct_table)


# --- real data: the COCO val2017 caption file ----------------------------------------------

MEN_WORDS = (r"man|men|boy|boys|gentleman|gentlemen|guy|guys|male|he|his|him|husband|father|son"
             r"|brother")
WOMEN_WORDS = r"woman|women|girl|girls|lady|ladies|female|she|her|wife|mother|daughter|sister"


def test_coco_val_captions_mention_men_about_twice_as_often_as_women(shared_data, tmp_path):
    path = shared_data / "coco_val2017_captions.json"
    table, counts = _run_job([path], tmp_path / "out", *TWO_WORKERS)
    captions = [a["caption"] for a in json.loads(path.read_text())["annotations"]]
    assert counts["records_read"] == len(captions) == 25014
    assert counts["annotated"] + counts["quarantined"] == len(captions)
    attributes = table.column("attributes").to_pylist()
    men = sum(MAN in a for a in attributes)
    women = sum(WOMAN in a for a in attributes)
    # An independent count with plain regular expressions over the same captions.
    men_pattern = re.compile(rf"\b({MEN_WORDS})\b", re.IGNORECASE)
    women_pattern = re.compile(rf"\b({WOMEN_WORDS})\b", re.IGNORECASE)
    regex_men = sum(bool(men_pattern.search(c)) for c in captions)
    regex_women = sum(bool(women_pattern.search(c)) for c in captions)
    assert abs(men - regex_men) / regex_men < 0.05
    assert abs(women - regex_women) / regex_women < 0.05
    assert 1.6 < men / women < 2.4
    assert abs(men / women - regex_men / regex_women) < 0.1


# --- bad input ------------------------------------------------------------------------------

def _png(size, mode="1"):
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def broken_inputs(coco_mini_shards, webdataset_writer, tmp_path_factory):
    """A folder of good and broken inputs; returns (folder, expected quarantine reasons, expected
    annotated keys)."""
    folder = tmp_path_factory.mktemp("broken_inputs")
    r = coco_mini_shards.records
    write_webdataset_shards = webdataset_writer

    def sample(record, **members):
        base = {"__key__": record["key"], "jpg": record["jpg"], "txt": record["caption"].encode()}
        base.update(members)
        return {name: value for name, value in base.items() if value is not None}

    duplicate_of_r0 = dict(sample(r[0]), txt=b"A later copy with the same key")
    write_webdataset_shards(folder, [sample(x) for x in r[0:5]] + [duplicate_of_r0], 100, "a-good")
    write_webdataset_shards(folder, [
        sample(r[5], jpg=r[5]["jpg"][:2000]),                            # truncated JPEG
        sample(r[6], txt=b"   "),                                        # blank caption
        sample(r[7], txt=None, json=b'{"image_id": 1}'),                 # no caption anywhere
        sample(r[8], txt=b"caf\xe9 au lait"),                            # Latin-1, not UTF-8
        sample(r[9], jpg=None),                                          # no image member
        sample(r[10], jpg=None, png=_png((12000, 12000))),              # decompression bomb
        sample(r[11]),
    ], 100, "b-bad-samples")
    write_webdataset_shards(folder, [sample(x) for x in r[12:15]], 100, "c-truncated")
    truncated = folder / "c-truncated-00000.tar"
    data = truncated.read_bytes()
    truncated.write_bytes(data[:data.index(r[14]["jpg"][2000:2064])])  # cut inside r14's JPEG
    write_webdataset_shards(folder, [], 100, "d-empty")
    (folder / "d-empty-00000.tar").write_bytes(b"")
    (folder / "e-garbage.tar").write_bytes(b"not a tar at all\n" * 100)
    unsafe = [{"__key__": "../../evil", "txt": b"x"}, sample(r[15])]
    write_webdataset_shards(folder, unsafe, 100, "f-unsafe")
    write_webdataset_shards(folder, [sample(r[1])], 100, "g-duplicate")
    (folder / "h-table.jsonl").write_bytes(
        b'{"key": "j1", "caption": "A man cooking in a kitchen", "score": 0.75}\n'
        b'{"key": "j2", "caption": "A woman on a bench", "score": "n/a"}\n'
        b'{"key": "j3", "score": 1}\nnot json\n')
    (folder / "i-table.csv").write_text("key,caption,score\nc1,A girl with a kite,0.5\n"
                                        "c2,\"Two dogs, one ball\",2\n")
    table = pa.table({"key": ["p1", "p2"], "caption": ["A boy and his bicycle", "A pizza"],
                      "score": [0.1, None]})
    pq.write_table(table, folder / "j-table.parquet")
    expected_reasons = {
        quarantine.DUPLICATE_KEY: 2, quarantine.UNDECODABLE_IMAGE: 1, quarantine.EMPTY_CAPTION: 1,
        quarantine.MISSING_CAPTION: 2, quarantine.NON_UTF8_TEXT: 1, quarantine.MISSING_IMAGE: 1,
        quarantine.IMAGE_TOO_LARGE: 1, quarantine.TRUNCATED_TAR: 1, quarantine.EMPTY_SHARD: 1,
        quarantine.UNREADABLE_FILE: 1, quarantine.UNSAFE_MEMBER_NAME: 1, quarantine.BAD_JSON: 1}
    expected_keys = {x["key"] for x in r[0:5] + r[11:12] + r[12:14] + r[15:16]} | {
        "j1", "j2", "c1", "c2", "p1", "p2"}
    return folder, expected_reasons, expected_keys


@pytest.fixture(scope="module")
def broken_job(broken_inputs, tmp_path_factory):
    folder, _, _ = broken_inputs
    output = tmp_path_factory.mktemp("annotate_broken")
    exit_code = cli.main([
        "annotate", "--input", str(folder / "*.tar"), "--input", str(folder / "*-table.*"),
        "--output", str(output), "--utility-field", "score", *TWO_WORKERS
    ])
    return exit_code, output, annotate.read_annotations(output), annotate.read_counts(output)


def test_broken_input_is_quarantined_with_reasons_and_nothing_valid_is_lost(
        broken_inputs, broken_job):
    _, expected_reasons, expected_keys = broken_inputs
    exit_code, output, table, counts = broken_job
    assert exit_code == 0
    assert counts["quarantined_by_reason"] == expected_reasons
    assert set(table.column("key").to_pylist()) == expected_keys
    assert table.num_rows == counts["annotated"] == len(expected_keys)
    assert counts["records_read"] == counts["annotated"] + counts["quarantined"]
    entries = _quarantine_entries(output)
    assert len(entries) == counts["quarantined"]
    assert all(e["stage"] in (quarantine.STAGE_READ, quarantine.STAGE_DECODE,
                              quarantine.STAGE_ANNOTATE, quarantine.STAGE_DEDUPLICATE)
               for e in entries)


def test_duplicate_keys_keep_the_copy_from_the_smallest_shard_and_position(
        broken_inputs, broken_job, coco_mini_shards):
    _, output, table, _ = broken_job
    r = coco_mini_shards.records
    rows = {row["key"]: row for row in table.to_pylist()}
    assert rows[r[0]["key"]]["caption"] == r[0]["caption"]  # not "A later copy ..."
    assert rows[r[0]["key"]]["position"] == 0
    assert rows[r[1]["key"]]["shard"].endswith("a-good-00000.tar")
    duplicates = sorted((e["key"], e["shard"].rsplit("/", 1)[1], e["position"])
                        for e in _quarantine_entries(output)
                        if e["reason"] == quarantine.DUPLICATE_KEY)
    assert duplicates == sorted([(r[0]["key"], "a-good-00000.tar", 5),
                                 (r[1]["key"], "g-duplicate-00000.tar", 0)])


def test_label_set_counts_match_the_rows_written_after_duplicates_leave(broken_job):
    """label-sets.jsonl (what balance counts signatures from) counts the rows in the Parquet files:
    the duplicates the job took out of the written files are not in it."""
    _, output, table, _ = broken_job
    written = collections.Counter(
        (tuple(sorted(row["attributes"])), tuple(sorted(row["concepts"])), row["utility"])
        for row in table.to_pylist())
    counted = collections.Counter()
    for line in (output / annotate.LABEL_SETS_FILE).read_text().splitlines():
        entry = json.loads(line)
        attributes, concepts, utility = entry["label_set"]
        counted[(tuple(sorted(attributes)), tuple(sorted(concepts)), utility)] += entry["count"]
    assert counted == written
    assert all(n > 0 for n in counted.values())


def test_tables_carry_captions_and_utility(broken_job):
    _, _, table, _ = broken_job
    rows = {row["key"]: row for row in table.to_pylist()}
    assert rows["j1"]["utility"] == 0.75 and rows["j1"]["attributes"] == [MAN]
    assert rows["j1"]["concepts"] == ["kitchen"]
    assert rows["j2"]["utility"] is None  # "n/a" is no number
    assert rows["c1"]["utility"] == 0.5 and rows["c1"]["attributes"] == [WOMAN]
    assert rows["c2"]["concepts"] == ["dog", "sports ball"]
    assert rows["p1"]["attributes"] == [MAN] and rows["p2"]["utility"] is None


def test_missing_input_is_a_clear_error(tmp_path, capsys):
    from pipeline import cli

    with pytest.raises(FileNotFoundError, match="no input files match"):
        annotate.run(["--input", str(tmp_path / "nothing-*.tar"), "--output", str(tmp_path / "o")])
    missing = ["annotate", "--input", str(tmp_path / "nothing-*.tar"), "--output",
               str(tmp_path / "o")]
    assert cli.main(missing) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("balancebeam annotate: no input files match") and error.count("\n") == 0


# --- image zero-shot annotator inside the job -----------------------------------------------

def test_zero_shot_job_with_a_tiny_model_and_precomputed_embeddings(
        coco_mini_shards, tiny_clip, tmp_path):
    import numpy as np

    from pipeline.annotators.image import ZeroShotConfig, ZeroShotImageAnnotator
    from pipeline.annotators.lexicon import Lexicon

    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(3, 32)).tolist()
    table_path = tmp_path / "embedded.jsonl"
    table_path.write_text("".join(
        json.dumps({"key": f"e{i}", "caption": "A man on a bench", "emb": vector}) + "\n"
        for i, vector in enumerate(embeddings + [[1.0, 2.0]])))  # the last one has the wrong size
    image_flags = [
        "--image-model", tiny_clip.architecture, "--image-model-config", str(tiny_clip.config_path),
        "--image-checkpoint", str(tiny_clip.checkpoint_path), "--image-embedding-field", "emb",
        "--person-margin", "-10", "--concept-top-k", "2", "--concept-min-probability", "0",
        "--image-batch-size", "16"
    ]
    table, counts = _run_job([coco_mini_shards.glob, table_path], tmp_path / "out",
                             *image_flags, *TWO_WORKERS)
    assert counts["annotated"] == 159 + 3
    assert counts["quarantined_by_reason"] == {quarantine.BAD_EMBEDDING: 1}
    rows = {row["key"]: row for row in table.to_pylist()}
    config = ZeroShotConfig(tiny_clip.architecture, str(tiny_clip.checkpoint_path),
                            str(tiny_clip.config_path), person_margin=-10.0, concept_top_k=2,
                            concept_min_probability=0.0)
    lexicon = Lexicon.load()
    direct = ZeroShotImageAnnotator(config, lexicon.groups, lexicon.concepts)
    records = coco_mini_shards.records[:8]
    expected = direct.annotate_images([record["jpg"] for record in records])
    for record, (image_attributes, image_concepts, scores) in zip(records, expected):
        row = rows[record["key"]]
        text_attributes, text_concepts, _ = annotate_caption(record["caption"])
        evidence = json.loads(row["evidence"])
        assert row["attributes"] == sorted(set(text_attributes) | set(image_attributes))  # union
        assert row["concepts"] == sorted(set(text_concepts) | set(image_concepts))
        assert evidence["image"] == pytest.approx(scores, abs=1e-3)
        assert {c for c, found_by in evidence["concepts"].items() if "image" in found_by} == set(
            image_concepts
        )
    from_embeddings = direct.annotate_embeddings(np.array(embeddings))
    for i, (image_attributes, _, _) in enumerate(from_embeddings):
        assert set(image_attributes) <= set(rows[f"e{i}"]["attributes"])


def test_batch_labels_and_column_built_table_equal_the_row_by_row_ones(shared_data):
    """LabelText labels a batch at once and builds its table by column: the same table as labelling
    each caption and building each row (annotation_row, rows_table), on real COCO captions plus
    blank, non-ASCII and repeated ones, with and without utilities."""
    import json

    from pipeline.annotators.text import TextAnnotator
    from pipeline.labelling import rows_table
    from pipeline.records import annotation_row, annotation_table
    from pipeline.sources import make_sample

    document = json.loads((shared_data / "coco_mini" / "captions_val2017.json").read_text())
    captions = [a["caption"] for a in document["annotations"]][:300]
    captions += ["", "A WOMAN'S bike", "Ein Mann und eine Frau", "a man", "a man", "Σ café nurse"]
    samples = [make_sample(f"k{i}", "in.jsonl", i, caption, None, {"u": i / 7},
                           None if i % 3 else i) for i, caption in enumerate(captions)]
    annotator = TextAnnotator()
    codes, answers = annotator.label_batch(captions)
    assert len(answers) < len(captions)  # repeated answers listed once
    fresh = TextAnnotator()  # row by row, with a memo of its own
    for caption, code in zip(captions, codes):
        assert answers[code] == fresh.labels(caption)
    for utilities in (None, [sample["meta"]["u"] for sample in samples]):
        rows = [annotation_row(sample, *fresh.labels(sample["caption"])[:2],
                               fresh.labels(sample["caption"])[3],
                               None if utilities is None else utilities[i])
                for i, sample in enumerate(samples)]
        assert annotation_table(samples, codes, answers, utilities).equals(rows_table(rows))


def _read_check_label(file_range, tables, utility_field):
    """ReadRangeBatches -> CheckSamples -> LabelText on one range, in this process: (annotation
    rows, quarantine entries, the read counts, whether a sample table came out)."""
    from apache_beam.pvalue import TaggedOutput

    from pipeline.counts import COUNTS_TAG
    from pipeline.labelling import CheckSamples, LabelText
    from pipeline.annotators.lexicon import Lexicon

    reader = ReadRangeBatches(tables=tables, utility_field=utility_field)
    checker, labeller = CheckSamples(), LabelText(Lexicon.load(), utility_field)
    rows, entries, counts, as_table = [], [], None, False

    def route(outputs, then):
        for output in outputs:
            if isinstance(output, TaggedOutput):
                if output.tag == COUNTS_TAG:
                    nonlocal counts
                    counts = output.value
                else:
                    entries.append(output.value)
            else:
                then(output)

    def labelled(batch):
        nonlocal as_table
        as_table |= isinstance(batch, pa.Table)
        route(labeller.process(batch), lambda table: rows.extend(table.to_pylist()))

    route(reader.process(file_range), lambda batch: route(checker.process(batch), labelled))
    return rows, entries, counts, as_table


def test_jsonl_ranges_read_as_tables_give_the_rows_json_loads_gives(shared_data, tmp_path):
    """The text annotator reads JSONL ranges with pyarrow's parser into sample tables; the rows,
    quarantine entries and counts are those of json.loads line by line, on real COCO captions with
    integer and encoded keys, missing and empty keys, blank and missing captions, and utilities of
    every JSON type; ranges pyarrow would read otherwise go line by line, to the same result."""
    from pipeline.splits import plan_ranges

    document = json.loads((shared_data / "coco_mini" / "captions_val2017.json").read_text())
    captions = [a["caption"] for a in document["annotations"]][:400]
    utilities = [0.5, 2, "0.25", "high", None, True, {"a": 1}, [1, 2], 1e308, -3, "nan", 7.5]
    lines = []
    for i, caption in enumerate(captions):
        row = {"key": f"c.{i}" if i % 7 == 0 else f"c-{i}", "caption": caption, "image_id": i,
               "u": utilities[i % len(utilities)]}
        if i % 50 == 3:
            row["caption"] = "   "
        if i % 50 == 4:
            del row["caption"]
        if i % 50 == 5:
            del row["key"]
        if i % 50 == 6:
            row["key"] = ""
        if i % 50 == 7:
            row["key"] = f"ключ/{i}"
        if i % 50 == 8:
            row["image_id"] = None
        lines.append(json.dumps(row, ensure_ascii=i % 2 == 0))
    clean = "\n".join(lines) + "\n"
    integer_keys = "".join(json.dumps({"key": 10 ** 12 + i, "caption": c}) + "\n"
                           for i, c in enumerate(captions[:50]))
    numbers = [None, 0.5, 1, float("inf"), -2.5, float("nan"), 10 ** 20, 0]
    numeric_lines = [json.dumps(dict(json.loads(line), u=numbers[i % len(numbers)]))
                     for i, line in enumerate(lines)]
    numeric = "\n".join(numeric_lines) + "\n"
    # (text, read as a table without a utility field, and with `u` as the utility field)
    variants = {
        "clean": (clean, True, False),  # utilities of every type: json.loads's, row by row
        "numeric utilities": (numeric, True, True),
        "integer keys": (integer_keys, True, True),
        "no newline at the end": (clean.rstrip("\n"), True, False),
        "one line, no newline": (numeric_lines[0], True, True),
        "crlf": (numeric.replace("\n", "\r\n"), True, True),
        "a bad line": (numeric.replace(numeric_lines[10], "{not json"), False, False),
        "a blank line": (numeric.replace("\n", "\n\n", 1), False, False),
        "whitespace at the end": (numeric + "  ", False, False),
        "two objects on one line": (clean.replace(lines[10], lines[10] + " " + lines[11]), False,
                                    False),
        "a blank line and two objects on one line": (numeric.replace(
            numeric_lines[10], numeric_lines[10] + " " + numeric_lines[11]).replace(
                "\n", "\n\n", 1), False, False),
        "a float key": (clean.replace(lines[10], json.dumps({"key": 1.5, "caption": "a man"})),
                        False, False),
        "a number caption": (clean.replace(lines[10], json.dumps({"key": "n", "caption": 5})),
                             False, False),
        "a bare carriage return": (
            clean.replace(lines[10], lines[10] + "\r" + json.dumps({"key": "r", "caption": "x"})),
            False, False),
        "a byte-order mark": ("\ufeff" + clean, False, False),
    }
    for name, (text, fast, fast_with_utility) in variants.items():
        path = tmp_path / f"{len(name)}-{name.replace(' ', '_')}.jsonl"
        path.write_bytes(text.encode("utf-8"))
        whole = plan_ranges(str(path))
        assert len(whole) == 1 and whole[0]["start"] is None  # small: one whole-file range
        cut = [dict(whole[0], start=0, end=len(text.encode("utf-8")))]  # as a planned range
        for file_range in whole + cut:
            for utility_field, table_expected in ((None, fast), ("u", fast_with_utility)):
                by_table = _read_check_label(file_range, True, utility_field)
                by_line = _read_check_label(file_range, False, utility_field)
                assert by_table[3] is table_expected, (name, utility_field)
                assert not by_line[3]
                assert by_table[:3] == by_line[:3], name
    rows, entries, counts, _ = _read_check_label(
        plan_ranges(str(tmp_path / "5-clean.jsonl"))[0], True, "u")
    assert counts["records_read"] == len(captions) == len(rows) + len(entries)
    reasons = collections.Counter(entry["reason"] for entry in entries)
    assert reasons == {"missing_key": 16, "missing_caption": 8, "empty_caption": 8}
    assert {row["utility"] for row in rows} >= {0.5, 2.0, 0.25, 1e308, -3.0, 7.5, None}
