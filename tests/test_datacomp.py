"""A DataComp-layout pool (Parquet metadata with `uid` and `text`) in, DataComp's subset file out.

The subset file is checked the way DataComp's resharder uses it (np.load with mmap_mode, the dtype,
np.searchsorted on the uids) and against the metadata alone: the kept uids' captions are annotated
again here and every share the plan constrains is recounted.
"""
import json
import pathlib
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import cli
from pipeline.annotators.text import annotate_caption
from solvers.solution import BalanceSolution

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bench.pool import make_pool  # noqa: E402

TWO_WORKERS = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]
IN_PROCESS = ["--direct_running_mode=in_memory"]
ROWS, SHARDS, GAP = 30_000, 3, 0.05
# DataComp's, written out here rather than imported from balancebeam
SUBSET_DTYPE = np.dtype("u8,u8")


def _uid_pair(uid: str):
    return int(uid[:16], 16), int(uid[16:], 16)


@pytest.fixture(scope="module")
def pool(shared_data, tmp_path_factory):
    directory = tmp_path_factory.mktemp("pool")
    make_pool(directory, ROWS, SHARDS, row_group_size=4000)
    return directory


@pytest.fixture(scope="module")
def subset_run(pool, tmp_path_factory):
    output = tmp_path_factory.mktemp("subset_run")
    assert cli.main([
        "run", "--input", str(pool / "*.parquet"), "--output", str(output), "--keep-rate", "max",
        "--association-gap", str(GAP), "--representation-gap", str(GAP), "--output-format",
        "subset", *TWO_WORKERS
    ]) == 0
    return output


def _metadata(pool):
    return pa.concat_tables(
        pq.read_table(path, columns=["uid", "text"]) for path in sorted(pool.glob("*.parquet")))


def test_the_subset_file_is_what_datacomps_resharder_loads(pool, subset_run):
    release = subset_run / "release"
    subset = np.load(release / "subset.npy", mmap_mode="r")  # as the resharder opens it
    assert subset.dtype == SUBSET_DTYPE and subset.ndim == 1
    as_tuples = subset.tolist()
    assert as_tuples == sorted(set(as_tuples))  # sorted and unique: searchsorted needs it
    metadata = _metadata(pool)
    uids = metadata.column("uid").to_pylist()
    pairs = np.array([_uid_pair(uid) for uid in uids], dtype=SUBSET_DTYPE)
    found = np.searchsorted(subset, pairs)
    member = (found < len(subset)) & (subset[np.minimum(found, len(subset) - 1)] == pairs)
    keep = pq.read_table(release / "keep.parquet").to_pydict()
    assert keep["key"] == sorted(uids)  # one row per record, sorted by key
    kept_by_keep_file = {key for key, copies in zip(keep["key"], keep["copies"]) if copies > 0}
    assert {uid for uid, is_member in zip(uids, member) if is_member} == kept_by_keep_file
    assert int(member.sum()) == len(subset)
    manifest = json.loads((release / "manifest.json").read_text())
    assert manifest["format"] == "subset" and manifest["shards"] == []
    assert manifest["counts"]["kept"] == len(subset) and manifest["counts"]["samples_read"] == ROWS
    assert manifest["files"]["subset.npy"]["rows"] == len(subset)
    assert not list(release.glob("*.tar"))


def test_the_subset_meets_the_requested_gaps_recounted_from_the_metadata(pool, subset_run):
    """Every (value, concept) the plan constrains, counted over the kept uids' own captions."""
    subset = np.load(subset_run / "release" / "subset.npy")
    kept = set(subset.tolist())
    solution = BalanceSolution.from_json((subset_run / "solution.json").read_text())
    spec = solution.spec
    rows = []
    metadata = _metadata(pool)
    for uid, text in zip(metadata.column("uid").to_pylist(), metadata.column("text").to_pylist()):
        if _uid_pair(uid) in kept:
            attributes, concepts, _ = annotate_caption(text)
            rows.append((set(attributes), set(concepts)))
    assert len(rows) == len(kept)
    constrained = 0
    for value, concept, gap in zip(spec.unit_values, spec.unit_concepts, spec.unit_gaps):
        name = spec.attribute_names[value]
        among = [a for a, c in rows if a and (concept < 0 or spec.concept_names[concept] in c)]
        if among:
            constrained += 1
            share = sum(name in a for a in among) / len(among)
            assert abs(share - spec.targets[value]) <= gap + 1e-9, (name, concept, share)
    assert constrained >= 40
    assert len(rows) >= 0.995 * solution.statistics["max_keep_rate"] * ROWS


def test_subset_and_shards_keep_the_same_records_and_runners_agree(pool, subset_run, tmp_path):
    """The same annotations and solution: a WebDataset release keeps the subset's records, and an
    in-process subset release is byte-identical to the two-worker one."""
    common = [
        "--annotations", str(subset_run / "annotations"), "--solution",
        str(subset_run / "solution.json")
    ]
    assert cli.main([
        "resample", *common, "--output", str(tmp_path / "subset"), "--output-format", "subset",
        *IN_PROCESS
    ]) == 0
    two_workers = json.loads((subset_run / "release" / "manifest.json").read_text())
    in_process = json.loads((tmp_path / "subset" / "manifest.json").read_text())
    # sizes and sha256 of subset.npy and keep.parquet
    assert in_process["files"] == two_workers["files"]
    assert cli.main([
        "resample", *common, "--input", str(pool / "*.parquet"), "--output",
        str(tmp_path / "shards"), "--samples-per-shard", "5000", *TWO_WORKERS
    ]) == 0
    import webdataset

    keys = {sample["__key__"] for sample in webdataset.WebDataset(
        sorted(str(p) for p in (tmp_path / "shards").glob("*.tar")), shardshuffle=False)}
    keep = pq.read_table(subset_run / "release" / "keep.parquet").to_pydict()
    assert keys == {key for key, copies in zip(keep["key"], keep["copies"]) if copies}
    sizes = json.loads((tmp_path / "shards" / "sizes.json").read_text())
    assert sum(sizes.values()) == len(keys)


def test_a_table_without_a_caption_column_stops_at_once_naming_its_columns(tmp_path, capsys):
    table = tmp_path / "pool.parquet"
    pq.write_table(pa.table({"uid": ["0" * 32], "url": ["https://example.invalid/x.jpg"],
                             "alt": ["a man"]}), table)
    assert cli.main(["annotate", "--input", str(table), "--output", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "has no caption column (caption or text)" in error
    assert "'uid', 'url', 'alt'" in error and "--caption-column" in error
    assert not (tmp_path / "out" / "counts.json").exists()
    assert cli.main(["annotate", "--input", str(table), "--output", str(tmp_path / "out"),
                     "--caption-column", "alt", "--key-column", "id"]) == 2
    assert "no --key-column 'id'" in capsys.readouterr().err


def test_inputs_that_would_be_read_by_different_columns_are_refused(tmp_path, capsys):
    """One glob of balancebeam tables, one of DataComp metadata: the columns differ, so say so."""
    pq.write_table(pa.table({"key": ["k1"], "caption": ["a man"]}), tmp_path / "ours.parquet")
    pq.write_table(pa.table({"uid": ["ab" * 16], "text": ["a woman"]}),
                   tmp_path / "datacomp.parquet")
    assert cli.main(["annotate", "--input", str(tmp_path / "ours.parquet"), "--input",
                     str(tmp_path / "datacomp.parquet"), "--output", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "('key', 'caption')" in error and "('uid', 'text')" in error and "--key-column" in error


def test_datacomp_columns_are_found_by_themselves(tmp_path):
    """`text` and `uid` (DataComp) are read without flags; `caption` and `key` still win where
    present."""
    table = tmp_path / "pool.parquet"
    pq.write_table(
        pa.table(
            {"uid": ["ab" * 16, "cd" * 16], "text": ["a woman riding a horse", "a man cooking"]}),
        table)
    assert cli.main(["annotate", "--input", str(table), "--output", str(tmp_path / "out")]) == 0
    rows = pq.read_table(next((tmp_path / "out").glob("annotations-*.parquet"))).to_pydict()
    assert sorted(rows["key"]) == ["ab" * 16, "cd" * 16]
    assert sorted(rows["caption"]) == ["a man cooking", "a woman riding a horse"]
    counts = json.loads((tmp_path / "out" / "counts.json").read_text())
    assert counts["read_options"]["caption_column"] == "text" and counts["read_options"][
        "key_column"] == "uid"


# --- zero-shot from stored embeddings: the same labels as from the images ------------------------

def _labels(directory):
    from pipeline import annotate

    table = annotate.read_annotations(directory).to_pydict()
    return {
        key: (tuple(a), tuple(c))
        for key, a, c in zip(table["key"], table["attributes"], table["concepts"])
    }


@pytest.mark.slow
def test_prompt_file_and_float16_embeddings_label_like_the_images(coco_mini_shards, tiny_clip,
                                                                  tmp_path):
    """A tiny random-weight open_clip model embeds coco_mini's images (stored as float16, DataComp's
    layout) and, through embed-prompts, its prompts; annotating the metadata with the prompt file
    and no model gives the labels annotating the images with the model gives, on >= 99% of rows,
    and the same float32 embeddings give them on every row (what differs is float16 rounding)."""
    from pipeline.annotators.image import ZeroShotConfig, ZeroShotImageAnnotator
    from pipeline.annotators.lexicon import Lexicon

    thresholds = [
        "--person-margin", "-1", "--concept-top-k", "2", "--concept-min-probability", "0.05"
    ]
    model = [
        "--image-model", tiny_clip.architecture, "--image-model-config", str(tiny_clip.config_path),
        "--image-checkpoint", str(tiny_clip.checkpoint_path)
    ]
    assert cli.main([
        "annotate", "--input", coco_mini_shards.glob, "--output", str(tmp_path / "from-images"),
        *model, *thresholds, *TWO_WORKERS
    ]) == 0
    assert cli.main(["embed-prompts", *model, "--output", str(tmp_path / "prompts.npz")]) == 0

    lexicon = Lexicon.load()
    model = ZeroShotConfig(tiny_clip.architecture, str(tiny_clip.checkpoint_path),
                           str(tiny_clip.config_path))
    direct = ZeroShotImageAnnotator(model, lexicon.groups, lexicon.concepts)
    records = coco_mini_shards.records
    embeddings = np.concatenate([direct.embed_images([r["jpg"] for r in records[i:i + 32]])
                                 for i in range(0, len(records), 32)])
    pool = tmp_path / "pool"
    pool.mkdir()
    no_faces = pa.array([[] for _ in records], type=pa.list_(pa.list_(pa.float64())))
    table = pa.table({"uid": [r["key"] for r in records], "text": [r["caption"] for r in records],
                      "face_bboxes": no_faces})
    pq.write_table(table, pool / "00000000.parquet")
    for name, vectors in (("float16", embeddings.astype(np.float16)), ("float32", embeddings)):
        np.savez(pool / "00000000.npz", l14_img=vectors)
        assert cli.main([
            "annotate", "--input", str(pool / "*.parquet"), "--output", str(tmp_path / name),
            "--prompt-embeddings", str(tmp_path / "prompts.npz"), "--embeddings-field", "l14_img",
            *thresholds, *TWO_WORKERS
        ]) == 0
    from_images, from_float16, from_float32 = (_labels(tmp_path / name)
                                               for name in ("from-images", "float16", "float32"))
    assert set(from_images) == set(from_float16) == {r["key"] for r in records}
    assert from_float32 == from_images
    agree = sum(from_float16[key] == labels for key, labels in from_images.items())
    assert agree >= 0.99 * len(records)
    # the image annotator did label rows (not only the captions): some attribute no caption gives
    assert any(set(labels[0]) - set(annotate_caption(r["caption"])[0]) for r, labels in
               ((r, from_images[r["key"]]) for r in records))

    # face_bboxes, when asked for, decides who is visible: no faces anywhere -> no image attribute
    assert cli.main([
        "annotate", "--input", str(pool / "*.parquet"), "--output", str(tmp_path / "faces"),
        "--prompt-embeddings", str(tmp_path / "prompts.npz"), "--embeddings-field", "l14_img",
        "--faces-column", "face_bboxes", *thresholds
    ]) == 0
    for record in records:
        attributes = set(_labels(tmp_path / "faces")[record["key"]][0])
        assert attributes == set(annotate_caption(record["caption"])[0])


def test_a_missing_npz_quarantines_its_rows_with_the_reason(tmp_path, tiny_clip):
    from pipeline import annotate

    pq.write_table(pa.table({"uid": ["ab" * 16, "cd" * 16], "text": ["a man", "a woman"]}),
                   tmp_path / "0.parquet")
    prompts = tmp_path / "prompts.npz"
    assert cli.main([
        "embed-prompts", "--image-model", tiny_clip.architecture, "--image-model-config",
        str(tiny_clip.config_path), "--output", str(prompts)
    ]) == 0
    assert cli.main([
        "annotate", "--input", str(tmp_path / "0.parquet"), "--output", str(tmp_path / "out"),
        "--prompt-embeddings", str(prompts), "--embeddings-field", "l14_img"
    ]) == 0
    counts = annotate.read_counts(tmp_path / "out")
    assert counts["annotated"] == 0 and counts["quarantined_by_reason"] == {"bad_embedding": 2}
    entry = json.loads(
        next((tmp_path / "out").glob("quarantine-*.jsonl")).read_text().splitlines()[0])
    assert "0.npz" in entry["detail"]


def test_subset_reconciliation_fails_on_a_stray_part_or_a_lost_row():
    """The accounting names what differs; counts here are written out by hand."""
    from pipeline import publish
    from pipeline.errors import ReconciliationError

    counts = {"decisions_read": 10, "decided": 10, "kept": 7, "dropped": 3, "kept_not_uid": 0,
              "output_samples": 7, "kept_signatures": {"s": 7}}
    written = {
        "keep_rows_written": 10, "subset_rows_written": 7,
        "keep_parts_on_disk": ["part-00000-of-00001.parquet"],
        "keep_parts_written": ["part-00000-of-00001.parquet"]
    }
    assert publish.reconcile_subset(counts, written, 10)["kept"] == 7
    with pytest.raises(ReconciliationError, match="keep.parquet part files"):
        publish.reconcile_subset(
            counts,
            dict(
                written,
                keep_parts_on_disk=["part-00000-of-00001.parquet", "part-00009-of-00010.parquet"],
            ),
            10,
        )
    with pytest.raises(
        ReconciliationError, match="keep.parquet rows = annotation rows read: 9 != 10"
    ):
        publish.reconcile_subset(counts, dict(written, keep_rows_written=9), 10)
