"""The resample job on real coco_mini shards: counts that reconcile and follow q, exact mode's
k smallest draws, the same release with 1 and 2 workers (multi-process DirectRunner) and on the
portable runner against a local job service, reruns, repeat mode, missing records, bucket limits.

The pure parts it is built from: tests/test_keep_rule.py (sampling) and tests/test_tars.py (shards).
"""
import json
from collections import Counter

import numpy as np
import pytest
import webdataset

from pipeline import annotate, balance, hashing, plan, release, resample
from pipeline.signatures import SignatureTable, row_signature
from solvers.solution import BalanceSolution

ONE_WORKER = ["--direct_running_mode=multi_processing", "--direct_num_workers=1"]
TWO_WORKERS = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]
SAMPLES_PER_SHARD = 40


@pytest.fixture(scope="module")
def balanced_coco_mini(coco_mini_shards, tmp_path_factory):
    """coco_mini annotated (2 workers) and balanced: (input glob, annotations dir, solution path).
    """
    work = tmp_path_factory.mktemp("resample_coco_mini")
    annotate.run(
        ["--input", coco_mini_shards.glob, "--output", str(work / "annotations"), *TWO_WORKERS])
    config = plan.BalanceConfig(keep_rate=0.7, min_support=2, method="exact")
    balance.balance(str(work / "annotations"), str(work / "solution.json"), config, TWO_WORKERS)
    return coco_mini_shards.glob, str(work / "annotations"), str(work / "solution.json")


def _resample(balanced, output, *pipeline_args, **options):
    input_glob, annotations_dir, solution = balanced
    options.setdefault("samples_per_shard", SAMPLES_PER_SHARD)
    return resample.resample(options.pop("input_glob", input_glob), annotations_dir, solution,
                             str(output), seed=11, pipeline_args=list(pipeline_args), **options)


@pytest.fixture(scope="module")
def two_worker_release(balanced_coco_mini, tmp_path_factory):
    output = tmp_path_factory.mktemp("release_two_workers")
    return output, _resample(balanced_coco_mini, output, *TWO_WORKERS, mode="bernoulli")


def test_release_counts_reconcile_and_follow_q(two_worker_release, balanced_coco_mini):
    output, manifest = two_worker_release
    counts = manifest["counts"]
    assert counts["samples_read"] == counts["input_records"] == 159
    accounted = counts["kept"] + counts["dropped"] + counts["quarantined_total"]
    assert accounted == counts["samples_read"]
    assert counts["output_samples"] == counts["kept"] == sum(s["samples"]
                                                             for s in manifest["shards"])
    assert all(s["samples"] == SAMPLES_PER_SHARD for s in manifest["shards"][:-1])
    # Kept iff the keyed hash draw is below the row's planned q. The q here is Clarabel's primal
    # plan on the counted signatures (balance re-solved in the test), not the duals the job applies.
    rows = {r["key"]: r for r in annotate.read_annotations(balanced_coco_mini[1]).to_pylist()}
    table = SignatureTable.from_counts(Counter(
        row_signature(r["attributes"], r["concepts"]) for r in rows.values()).items())
    planned, projected = plan.solve_table(table, plan.BalanceConfig(keep_rate=0.7, min_support=2,
                                                                       method="exact"))
    q_of = {}
    for i in range(len(projected.weights)):
        attributes = frozenset(projected.attribute_names[k]
                               for k in np.flatnonzero(projected.attributes[i]))
        concepts = frozenset(projected.concept_names[r]
                             for r in np.flatnonzero(projected.concepts[i]))
        q_of[attributes, concepts] = planned.q[i]
    kept = {s["__key__"]: json.loads(s["json"]) for s in webdataset.WebDataset(
        sorted(str(p) for p in output.glob("*.tar")), shardshuffle=False)}
    checked = 0
    for key, row in rows.items():
        attributes = frozenset(row["attributes"]) & set(projected.attribute_names)
        concepts = frozenset(row["concepts"]) & set(
            projected.concept_names) if attributes else frozenset()
        q = q_of[attributes, concepts]
        draw = hashing.keyed_uniform(11, key)
        if abs(draw - q) > 1e-6:  # the duals reproduce the primal q to ~1e-7
            assert (key in kept) == (draw < q), key
            checked += 1
        if key in kept:
            assert kept[key]["balance"]["q"] == pytest.approx(q, abs=1e-6)
            assert kept[key]["balance"]["weight"] == 1.0
    assert checked >= len(rows) - 2


def test_exact_mode_keeps_the_k_smallest_draws_of_each_signature(shared_data, tmp_path):
    """The default mode: of each constrained signature, exactly balance's k_s rows, those whose
    keyed hash is smallest; counted here from the shards and the annotations alone."""
    from pipeline import cli

    captions = [
        a["caption"]
        for a in json.loads((shared_data / "coco_val2017_captions.json").read_text())["annotations"]
        if " man " in a["caption"] or " woman " in a["caption"]
    ][:300]
    table = tmp_path / "captions.jsonl"
    table.write_text("".join(
        json.dumps({"key": f"k{i:05d}", "caption": captions[i % len(captions)]}) + "\n"
        for i in range(3000)))
    output = tmp_path / "run"
    assert cli.main(["run", "--input", str(table), "--output", str(output), "--keep-rate", "max",
                     "--min-support", "20", "--seed", "11", *TWO_WORKERS]) == 0
    manifest = json.loads((output / "release" / "manifest.json").read_text())
    assert manifest["mode"] == "exact"
    solution = BalanceSolution.from_json((output / "solution.json").read_text())
    rule = release.KeepRule(solution, seed=11)
    kept = {
        s["__key__"]
        for s in webdataset.WebDataset(sorted(
            str(p) for p in (output / "release").glob("*.tar")
        ), shardshuffle=False)
    }
    by_signature = {}
    for row in annotate.read_annotations(output / "annotations").to_pylist():
        signature = rule.signature(row["attributes"], row["concepts"])
        by_signature.setdefault(signature, []).append(row["key"])
    ranked = 0
    for signature, keys in by_signature.items():
        rows, keep, constrained = solution.exact_counts[signature]
        assert rows == len(keys)
        if not constrained:
            continue
        smallest = sorted(keys, key=lambda key: (hashing.keyed_uniform(11, key), key))[:keep]
        assert {key for key in keys if key in kept} == set(smallest), signature
        ranked += 0 < keep < rows
    assert ranked >= 3
    assert manifest["counts"]["kept"] == len(kept)


def test_same_release_with_one_or_two_workers_and_on_the_portable_runner(
        two_worker_release, balanced_coco_mini, tmp_path, job_service):
    _, two = two_worker_release
    one = _resample(balanced_coco_mini, tmp_path / "one", *ONE_WORKER, mode="bernoulli")
    portable = _resample(balanced_coco_mini, tmp_path / "portable", "--runner=PortableRunner",
                         f"--job_endpoint=localhost:{job_service}", "--environment_type=LOOPBACK",
                         mode="bernoulli")
    assert len(two["shards"]) >= 3
    # names, sizes and sha256 of every shard
    assert one["shards"] == two["shards"] == portable["shards"]
    assert one["counts"] == two["counts"] == portable["counts"]


def test_rerun_into_the_same_directory_gives_the_same_release(two_worker_release,
                                                              balanced_coco_mini, tmp_path):
    _, reference = two_worker_release
    output = tmp_path / "rerun"
    # an earlier, different run into the same folder
    _resample(balanced_coco_mini, output, *TWO_WORKERS, samples_per_shard=10, mode="bernoulli")
    (output / "balanced-00003.tar.tmp-crashed").write_bytes(b"half a shard")
    stale_quarantine = output / "quarantine" / "resample-00001-of-00002.jsonl"
    stale_quarantine.write_text('{"key": "from-an-earlier-run"}\n')
    again = _resample(balanced_coco_mini, output, *TWO_WORKERS, mode="bernoulli")
    assert not stale_quarantine.exists()
    assert [p.name for p in (output / "quarantine").iterdir()] == ["resample-00000-of-00001.jsonl"]
    assert again["shards"] == reference["shards"]
    assert sorted(p.name
                  for p in output.glob("balanced-*")) == [s["name"] for s in reference["shards"]]
    for shard in again["shards"]:
        assert release.file_sha256(str(output / shard["name"])) == shard["sha256"]


def test_repeat_mode_writes_exactly_the_size_asked_and_unannotated_records_are_quarantined(
        balanced_coco_mini, coco_mini_shards, webdataset_writer, tmp_path):
    extra = webdataset_writer(
        tmp_path / "extra",
        [{"__key__": f"extra{i}", "txt": b"a woman riding a horse", "json": b"{}"}
         for i in range(3)], 10, prefix="extra")
    manifest = _resample(balanced_coco_mini, tmp_path / "repeat", *TWO_WORKERS, mode="repeat",
                         output_size=250, input_glob=[coco_mini_shards.glob, str(extra[0])])
    counts = manifest["counts"]
    assert counts["output_samples"] == 250 == sum(s["samples"] for s in manifest["shards"])
    assert counts["quarantined"] == {"resample:not_annotated": 3}
    assert counts["kept"] + counts["dropped"] + 3 == counts["samples_read"] == 162
    originals = {r["key"]: r for r in coco_mini_shards.records}
    keys = []
    for sample in webdataset.WebDataset(sorted(str(p) for p in (tmp_path / "repeat").glob("*.tar")),
                                        shardshuffle=False):
        keys.append(sample["__key__"])
        meta = json.loads(sample["json"])
        source = originals[sample["__key__"].split("_copy")[0]]
        assert sample["jpg"] == source["jpg"]
        copy = int(sample["__key__"].split("_copy")[1]) if "_copy" in sample["__key__"] else 0
        assert meta["balance"]["copy"] == copy
    assert len(keys) == len(set(keys)) == 250


def test_annotated_records_missing_from_the_input_leave_no_holes_and_kept_images_are_input_bytes(
        balanced_coco_mini, coco_mini_shards, tmp_path):
    # the third shard's annotations stay
    read_now = [str(path) for path in coco_mini_shards.paths[:2]]
    manifest = _resample(balanced_coco_mini, tmp_path / "part", *TWO_WORKERS, samples_per_shard=15,
                         input_glob=read_now)
    counts = manifest["counts"]
    originals = {r["key"]: r for r in coco_mini_shards.records if r["shard"] in read_now}
    left_out = [r for r in coco_mini_shards.records if r["shard"] not in read_now]
    assert counts["samples_read"] == len(originals)
    accounted = counts["kept"] + counts["dropped"] + counts["records_quarantined"]
    assert accounted == counts["samples_read"]
    # The third shard's annotation rows have no record now: each is counted and quarantined by name.
    assert counts["missing_from_input"] == len(
        left_out) == counts["quarantined"]["resample:missing_from_input"]
    entries = [json.loads(line) for path in (tmp_path / "part" / "quarantine").glob("*.jsonl")
               for line in path.read_text().splitlines()]
    assert sorted(e["key"] for e in entries if e["reason"] == "missing_from_input") == sorted(
        r["key"] for r in left_out)
    assert counts["output_samples"] == counts["kept"] == sum(s["samples"]
                                                             for s in manifest["shards"])
    assert all(s["samples"] == 15
               for s in manifest["shards"][:-1]) and manifest["shards"][-1]["samples"] <= 15
    released = list(webdataset.WebDataset(sorted(str(p) for p in (tmp_path / "part").glob("*.tar")),
                                          shardshuffle=False))
    assert len(released) == counts["kept"]
    for sample in released:
        source = originals[sample["__key__"]]
        assert sample["jpg"] == source["jpg"] and sample["txt"] == source["caption"].encode("utf-8")
        assert {k: v
                for k, v in json.loads(sample["json"]).items() if k != "balance"} == source["json"]


def test_ranking_buckets_bound_bytes_and_do_not_change_the_release(two_worker_release,
                                                                   balanced_coco_mini, tmp_path,
                                                                   monkeypatch):
    """Inline members count against a bucket's bytes (Beam's data plane refuses an element over 2
    GiB): with tiny limits the job ranks in many buckets and sends many small elements, and the
    release is the same, byte for byte."""
    from pipeline import shards

    assert shards.rank_buckets(150_000, 0) == 2
    assert shards.rank_buckets(10, 3 * shards.RANK_BUCKET_BYTES + 1) == 4
    _, reference = two_worker_release
    monkeypatch.setattr(shards, "RANK_BUCKET_BYTES", 64 * 1024)
    monkeypatch.setattr(shards, "ELEMENT_BYTES", 16 * 1024)
    chosen = []
    monkeypatch.setattr(resample, "rank_buckets",
                        lambda *args: chosen.append(shards.rank_buckets(*args)) or chosen[-1])
    # in one process, so the limits patched here are the ones the DoFns read
    small = _resample(balanced_coco_mini, tmp_path / "small-buckets",
                      "--direct_running_mode=in_memory", mode="bernoulli")
    assert chosen[0] > 10
    assert small["shards"] == reference["shards"] and small["counts"] == reference["counts"]


def test_kept_copies_travel_as_arrow_and_rank_in_pythons_order():
    """A bucket's kept copies, as the Arrow table they travel in, come back with every member
    (inline bytes, places in a tar, empty bytes) as added, and sort_and_rank orders them as Python
    sorts (order, copy key), non-ASCII keys and order ties included."""
    from pipeline import kept_copies, shards

    rng = np.random.default_rng(3)
    keys = ["b", "a", "é", "z", "ä-1", "Z", "日本", "a#1", "", "\U0001f600"]
    items = []
    for i, key in enumerate(keys * 3):
        members = [("txt", f"caption {i}".encode()), ("json", b"")]
        if i % 2:
            members.append(("jpg", (512 * i, 1000 + i, 2 ** 32 - 1 - i)))
        order = float(rng.choice([0.25, 0.5])) if i < 10 else float(rng.random())
        items.append((order, f"{key}#{i}", "/in/a.tar" if i % 2 else None, members))
    copies = kept_copies.KeptCopies()
    for item in items:
        copies.add(*item)
    assert len(copies) == len(items) and copies.inline_bytes == sum(
        len(data) for *_, members in items for _, data in members if isinstance(data, bytes))
    table = copies.table()
    assert table.schema == kept_copies.KEPT_SCHEMA
    assert list(kept_copies.kept_rows(table)) == items
    ranked = list(shards.sort_and_rank((4, table), {"offsets": {4: 100}}, 7))
    expected = sorted(items, key=lambda item: (item[0], item[1]))
    got = [entry for _, group in ranked for entry in group]
    assert got == [(100 + i, key, source, members)
                   for i, (_, key, source, members) in enumerate(expected)]
    assert [shard for shard, _ in ranked] == sorted({(100 + i) // 7 for i in range(len(items))})


def test_decisions_reach_their_input_range_through_files_row_for_row(tmp_path):
    """Each decision goes to the range whose start is the last at or before its position (range 0
    for a file read in one range, or not read now), through spill files, and comes back as it was:
    every row once, in the order of positions, floats and non-ASCII text exact."""
    from pipeline import decide, file_shuffle

    rng = np.random.default_rng(11)
    starts = {"/in/big.jsonl": [0, 100, 250], "/in/one.jsonl": [0]}
    batches = []
    # positions are distinct within a file (resample stops on a repeated one)
    for shard, size, first in (("/in/big.jsonl", 400, 0), ("/in/one.jsonl", 30, 0),
                               ("/in/gone.jsonl", 5, 0), ("/in/big.jsonl", 50, 800)):
        batches.append((shard, {
            # every even place: the ranges' own starts (0, 100, 250) among them
            "positions": (first + rng.permutation(np.arange(0, size * 2, 2))).tolist(),
            "keys": [f"k{i}-é日" for i in range(size)],
            "q": rng.random(size).tolist(), "weights": (1 / rng.random(size)).tolist(),
            "copies": rng.integers(0, 3, size).tolist(),
            "signatures": [f"s{i % 7}" for i in range(size)]}))
    expected = {}
    for shard, batch in batches:
        for row in zip(*(batch[name] for name in batch)):
            position = row[0]
            index = max([i for i, start in enumerate(starts.get(shard, [0])) if start <= position]
                        or [0])
            part = expected.setdefault((shard, index), {name: [] for name in batch})
            for name, value in zip(batch, row):
                part[name].append(value)
    spiller = file_shuffle.SpillParts(str(tmp_path), flush_rows=300)
    spiller.start_bundle()
    references = [reference for batch in batches
                  for part in decide.route_to_ranges(batch, starts)
                  for reference in spiller.process(part)]
    references += [reference.value for reference in spiller.finish_bundle()]
    grouped = {}
    for file_range, reference in references:
        grouped.setdefault(file_range, []).append(reference)
    assert len({path for _, (path, *_) in references}) > 1  # several spill files were read
    assert sorted(grouped) == sorted(expected)
    for file_range, refs in grouped.items():
        rows = sorted(zip(*expected[file_range].values()))  # by position
        assert decide.read_decisions(file_range, refs) == {
            name: [row[i] for row in rows] for i, name in enumerate(expected[file_range])}
    assert decide.read_decisions(("/in/new.jsonl", 0), []) == {name: [] for name in batches[0][1]}


def _range_outputs(file_range, decisions, mode, fast, monkeypatch):
    """ResampleRange on one range with these decisions: (each bucket's kept copies in rank order,
    copies per bucket, count dict, quarantine entries)."""
    import collections as collections_

    from apache_beam.pvalue import TaggedOutput

    from pipeline import shards
    from pipeline.counts import COUNTS_TAG
    from pipeline.kept_copies import kept_rows
    from pipeline.quarantine import QUARANTINE_TAG

    monkeypatch.setattr(shards, "read_decisions", lambda *_: {k: list(v) for k, v in
                                                             decisions.items()})
    if not fast:
        monkeypatch.setattr(shards.ResampleRange, "_caption_rows", lambda *_: None)
    step = shards.ResampleRange(11, mode, 4, "key", "caption")
    kept, sizes, counts, entries = collections_.defaultdict(list), Counter(), None, []
    for output in step.process(((file_range["path"], file_range["index"]),
                                {"read": [file_range], "decisions": ["ref"]})):
        if isinstance(output, TaggedOutput):
            if output.tag == COUNTS_TAG:
                counts = output.value
            elif output.tag == QUARANTINE_TAG:
                entries.append(output.value)
            else:
                sizes[output.value[0]] += output.value[1]
        else:
            kept[output[0]].extend(kept_rows(output[1]))
    return ({bucket: sorted(rows, key=lambda row: (row[0], row[1])) for bucket, rows in
             kept.items()}, sizes, counts, entries)


@pytest.mark.parametrize("mode", ["exact", "repeat"])
@pytest.mark.parametrize("keys", ["text", "integers"])
def test_caption_ranges_build_copies_as_columns_like_the_loop(shared_data, tmp_path, monkeypatch,
                                                              mode, keys):
    """ResampleRange builds a JSONL range's kept copies as columns when every line is annotated
    under its key: the same copies (members byte for byte: txt, json with `balance` where the row
    had it or at the end, encoded keys), bucket sizes and counts as its per-record loop, on real
    COCO captions; a range with a line annotate did not see, or whose key changed, goes through
    the loop."""
    from pipeline.keys import safe_key
    from pipeline.shards import ResampleRange
    from pipeline.splits import plan_ranges

    document = json.loads((shared_data / "coco_mini" / "captions_val2017.json").read_text())
    captions = [a["caption"] for a in document["annotations"]][:300]
    rows = []
    for i, caption in enumerate(captions):
        key = 10**15 + i if keys == "integers" else f"k.{i}" if i % 5 == 1 else f"ключ {i}" if (
            i % 5 == 2) else f"k-{i}"
        row = {"key": key, "caption": caption, "image_id": i, "score": i / 7}
        if i % 9 == 0:
            row = {"balance": "old", **row}
        if i % 11 == 0:
            row["caption"] = i  # not text: released as str(i)
        rows.append(row)
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row, ensure_ascii=i % 2 == 0) + "\n"
                            for i, row in enumerate(rows)))
    file_range = plan_ranges(str(path))[0]
    copies = [0 if i % 4 == 0 else (1 + i % 3 if mode == "repeat" else 1) for i in range(len(rows))]
    decisions = {"positions": list(range(len(rows))),
                 "keys": [safe_key(str(row["key"])) for row in rows],
                 "q": [0.25 + i % 3 / 4 for i in range(len(rows))],
                 "weights": [1.0 + i % 2 for i in range(len(rows))], "copies": copies,
                 "signatures": [f"s{i % 6}" for i in range(len(rows))]}
    columns = ResampleRange(11, mode, 4, "key", "caption")._caption_rows
    assert columns(file_range, decisions) is not None  # this range is built as columns
    fast = _range_outputs(file_range, decisions, mode, True, monkeypatch)
    monkeypatch.undo()
    loop = _range_outputs(file_range, decisions, mode, False, monkeypatch)
    monkeypatch.undo()
    assert fast == loop
    assert sum(fast[1].values()) == sum(copies) == fast[2]["output_samples"]
    assert len(fast[0]) > 1 and not fast[3]
    members = dict(next(rows_ for rows_ in fast[0].values())[0][3])
    assert set(members) == {"txt", "json"} and "balance" in json.loads(members["json"])
    # the loop decides ranges the columns cannot: a line annotate did not see, a changed key
    for changed in ({k: v[1:] for k, v in decisions.items()},
                    dict(decisions, keys=["other"] + decisions["keys"][1:])):
        assert columns(file_range, changed) is None
        fast = _range_outputs(file_range, changed, mode, True, monkeypatch)
        monkeypatch.undo()
        assert fast == _range_outputs(file_range, changed, mode, False, monkeypatch)
        monkeypatch.undo()
        assert fast[3]  # quarantined
