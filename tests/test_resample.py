"""The resample job: keyed-hash sampling, copies, shard writing, and the same release on every
runner.

Pure functions are tested directly; the Beam job runs on real coco_mini shards with 1 and 2
workers (multi-process DirectRunner) and on the portable runner against a local job service.
"""
import hashlib
import io
import json
from collections import Counter

import numpy as np
import pytest
import webdataset

from pipeline import annotate, balance, hashing, plan, release, resample, tars
from pipeline.signatures import SignatureTable, row_signature
from solvers.solution import BalanceSolution

ONE_WORKER = ["--direct_running_mode=multi_processing", "--direct_num_workers=1"]
TWO_WORKERS = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]
SAMPLES_PER_SHARD = 40


# --- pure functions ----------------------------------------------------------------------------

def test_keyed_uniform_is_deterministic_uniform_and_depends_on_seed_and_purpose():
    keys = [f"{i:09d}" for i in range(20000)]
    draws = np.array([hashing.keyed_uniform(7, key) for key in keys])
    assert draws.min() >= 0 and draws.max() < 1
    assert draws.tolist() == [hashing.keyed_uniform(7, key) for key in keys]
    # Chi-square over 20 bins against uniform: 99.9% quantile of chi2(19) is 43.8.
    observed = np.bincount((draws * 20).astype(int), minlength=20)
    assert ((observed - 1000) ** 2 / 1000).sum() < 43.8
    assert np.mean(draws == np.array([hashing.keyed_uniform(8, key) for key in keys])) == 0
    order = np.array([hashing.keyed_uniform(7, key, hashing.ORDER) for key in keys])
    assert abs(np.corrcoef(draws, order)[0, 1]) < 0.05


def test_bernoulli_keeps_a_fraction_q_of_keys_within_binomial_noise():
    keys = [f"key-{i}" for i in range(20000)]
    for q in (0.0, 0.3, 0.9, 1.0):
        kept = sum(hashing.keep_bernoulli(q, hashing.keyed_uniform(0, key)) for key in keys)
        assert abs(kept - q * len(keys)) <= 4 * np.sqrt(len(keys) * q * (1 - q)) + 1e-9


def test_repeat_copies_add_up_exactly_and_follow_q():
    rng = np.random.default_rng(0)
    q = rng.uniform(0, 1, 997)
    masses = [release.repeat_mass(value) for value in q]
    total = sum(masses)
    for size in (1, 500, 997, 2500):
        start, copies = 0, []
        for mass in masses:
            copies.append(release.repeat_copies(start, start + mass, total, size, 0.4321))
            start += mass
        assert sum(copies) == size
        expected = size * np.array(masses) / total
        assert np.all((np.array(copies) == np.floor(expected))
                      | (np.array(copies) == np.floor(expected) + 1))


def _tiny_solution(keep_rate=0.6):
    """Real solver on a table where men are 3/4 of 'kitchen' rows."""
    from solvers import solve
    from solvers.problem import BalanceProblem

    table = SignatureTable.from_records([
        {
            "attributes": ["perceived_gender:man"], "concepts": ["kitchen"], "utility": None,
            "count": 300
        },
        {
            "attributes": ["perceived_gender:woman"], "concepts": ["kitchen"], "utility": None,
            "count": 100
        },
        {"attributes": ["perceived_gender:man"], "concepts": [], "utility": None, "count": 100},
        {"attributes": ["perceived_gender:woman"], "concepts": [], "utility": None, "count": 300},
        {"attributes": [], "concepts": [], "utility": None, "count": 400},
    ])
    problem = BalanceProblem(table.attributes, table.concepts, groups=table.groups,
                             keep_rate=keep_rate, weights=table.weights, min_support=10,
                             attribute_names=table.attribute_names,
                             concept_names=table.concept_names, group_names=table.group_names)
    return solve(problem, method="exact")


def test_keep_rule_applies_the_solution_and_ignores_labels_it_does_not_know():
    solution = BalanceSolution.from_json(_tiny_solution().to_json())
    rule = release.KeepRule(solution, seed=3)
    man_kitchen = rule.keep_probability(["perceived_gender:man"], ["kitchen"])
    woman_kitchen = rule.keep_probability(["perceived_gender:woman"], ["kitchen", "unseen concept"])
    nobody = rule.keep_probability([], ["kitchen"])
    assert man_kitchen < woman_kitchen <= 1.0
    # Men at 300 and women at 100 kitchen rows: equal kept counts need q_man ~ q_woman / 3.
    men, women = 300 * man_kitchen, 100 * woman_kitchen
    assert abs(men - women) <= 0.02 * 2 * (men + women)
    assert nobody == rule.keep_probability([], [])
    assert rule.weight(0.5) == 1.0
    weights_rule = release.KeepRule(solution, mode="weights")
    assert weights_rule.weight(0.4) == pytest.approx(0.4 / solution.keep_rate)


def test_table_signatures_are_the_row_by_row_ones_and_copies_skip_only_draws_that_cannot_matter():
    """KeepRule.table_signatures finds a table's label sets in Arrow; each row must get the
    signature and q the row-by-row path gives it (label order, nulls, labels the solution does
    not know, and a label holding the separator, which sends the table row by row). fixed_copies
    answers without a draw only where the keyed draw cannot change the answer."""
    import pyarrow as pa

    solution = BalanceSolution.from_json(_tiny_solution().to_json())
    rule = release.KeepRule(solution, seed=3)
    man, woman = "perceived_gender:man", "perceived_gender:woman"
    label_sets = [([man], ["kitchen"]), ([woman], ["unseen", "kitchen"]),
                  ([woman], ["kitchen", "unseen"]), (None, ["kitchen"]), ([], None),
                  ([man, woman], []), (["other:x"], ["kitchen"]), ([woman], ["kitchen\x1fodd"])]
    for rows in (label_sets[:-1], label_sets):
        rows = rows * 3
        table = pa.table({"key": [f"k{i}" for i in range(len(rows))],
                          "attributes": pa.array([a for a, _ in rows], pa.list_(pa.string())),
                          "concepts": pa.array([c for _, c in rows], pa.list_(pa.string())),
                          "utility": pa.array([None] * len(rows), pa.float64())})
        of_row, signatures, q_of = rule.table_signatures(table)
        expected = release.KeepRule(solution, seed=3).signatures_and_probabilities(
            (a, c, None) for a, c in rows)
        assert [(signatures[i], q_of[i]) for i in of_row] == expected
        assert len(signatures) == len(set(signatures))
    assert rule.table_signatures(table.slice(0, 0))[1] == []
    # No draw is skipped that could matter: over many keys, copies equals the rule written out here.
    # exact counts as balance writes them: kept whole, none kept, ranked, and unconstrained
    solution.exact_counts = {signatures[0]: [300, 300, 1], signatures[1]: [100, 0, 1],
                             signatures[2]: [300, 120, 1], signatures[3]: [400, 400, 0]}
    exact = release.KeepRule(solution, seed=3, mode="exact")
    for signature, (rows, keep, constrained) in solution.exact_counts.items():
        for q in (0.0, 0.3, 1.0):
            fixed = exact.fixed_copies(q, signature)
            draws = [exact.copies(f"key{i}", q, signature) for i in range(200)]
            if constrained and keep >= rows:
                assert fixed == 1 and set(draws) == {1}
            elif constrained and keep <= 0:
                assert fixed == 0 and set(draws) == {0}
            elif constrained:
                assert fixed is None
            elif q in (0.0, 1.0):
                assert fixed == int(q) and set(draws) == {int(q)}
            else:
                assert fixed is None
                assert draws == [int(hashing.keyed_uniform(3, f"key{i}") < q) for i in range(200)]


def test_release_members_keep_bytes_and_add_balance_to_json():
    sample = {
        "key": "k1",
        "members": {"jpg": b"\xff\xd8jpeg", "txt": b"a man", "json": b'{"a": 1, "key": "k1"}'},
        "meta": {"a": 1, "key": "k1"}, "caption": "a man"
    }
    members = dict(release.release_members(sample, {"q": 0.5, "weight": 1.0}))
    assert members["jpg"] == b"\xff\xd8jpeg" and members["txt"] == b"a man"
    assert json.loads(
        members["json"]) == {"a": 1, "key": "k1", "balance": {"q": 0.5, "weight": 1.0}}
    table_row = {"key": "7", "members": {}, "meta": {"image_id": 3}, "caption": "a woman"}
    members = dict(release.release_members(table_row, {"q": 1.0, "weight": 1.0}))
    assert members["txt"] == b"a woman"
    assert json.loads(members["json"])["key"] == "7"


def test_write_shard_is_atomic_deterministic_and_readable(tmp_path):
    samples = [(f"{i:04d}", [("txt", f"caption {i}".encode()), ("json", b"{}")]) for i in range(5)]
    info = tars.write_shard(str(tmp_path / "x-00000.tar"), samples)
    data = (tmp_path / "x-00000.tar").read_bytes()
    assert info == {"name": "x-00000.tar", "samples": 5, "bytes": len(data),
                    "sha256": hashlib.sha256(data).hexdigest()}
    assert data == tars.tar_bytes(samples)
    assert [p.name for p in tmp_path.iterdir()] == ["x-00000.tar"]
    read = list(webdataset.WebDataset(str(tmp_path / "x-00000.tar"), shardshuffle=False))
    assert [s["__key__"] for s in read] == [key for key, _ in samples]
    assert read[3]["txt"] == b"caption 3"


def _tarfile_shard(samples) -> bytes:
    """The shard tarfile itself writes (PAX format, fixed headers): what tars.tar_bytes must equal.
    """
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w|", format=tarfile.PAX_FORMAT) as archive:
        for key, members in samples:
            for extension, data in members:
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = (
                    len(data), 0, 0o444, 0, 0, "", "")
                archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_shard_bytes_are_the_ones_tarfile_writes_for_plain_long_and_non_ascii_names():
    rng = np.random.default_rng(5)
    names = ["a", "x" * 96, "y" * 97, "z" * 150, "ключ", "dir/sub/k", "sp ace"]
    for trial in range(40):
        def payload():
            size = int(rng.choice([0, 1, 511, 512, 513, rng.integers(3000)]))
            return rng.integers(0, 256, size, dtype=np.uint8).tobytes()

        samples = [(f"{names[rng.integers(len(names))]}{i}",
                    [(extension, payload())
                     for extension in ("jpg", "txt", "json")[:rng.integers(1, 4)]])
                   for i in range(int(rng.integers(0, 12)))]
        assert tars.tar_bytes(samples) == _tarfile_shard(samples), trial


def test_member_offsets_agree_with_tarfile_and_leave_out_what_they_cannot_be_sure_of(tmp_path):
    import tarfile

    samples = [(f"k{i}", [("jpg", bytes([i]) * (700 * i)), ("txt", b"caption")]) for i in range(6)]
    samples.append(("p" * 120, [("jpg", b"long name, written with a pax record" * 200)]))
    path = tmp_path / "x.tar"
    path.write_bytes(tars.tar_bytes(samples))
    with open(path, "rb") as raw:
        offsets = tars.tar_member_offsets(raw)
    with tarfile.open(path) as archive:
        truth = {m.name: (m.offset_data, m.size) for m in archive.getmembers()}
    # the long name, written with a pax record, is found by that record
    assert set(offsets) == {f"k{i}.{e}"
                            for i in range(6)
                            for e in ("jpg", "txt")} | {"p" * 120 + ".jpg"}
    assert all(offsets[name] == [truth[name]] for name in offsets)
    with open(path, "rb") as raw:
        data = raw.read()
    for key, members in samples[:6]:
        located = tars.locate_members(key, dict(members), offsets)
        kinds = {extension: type(value) for extension, value in located}
        assert kinds == {
            "jpg": tuple if len(dict(members)["jpg"]) > tars.INLINE_MEMBER_BYTES else bytes,
            "txt": bytes
        }
        back = tars.read_members(located, lambda offset, size: data[offset:offset + size])
        assert back == dict(members)
    # A name seen twice, or a size that differs from what the reader saw, is not trusted: inline.
    big = b"j" * (tars.INLINE_MEMBER_BYTES + 1)
    assert tars.locate_members("k", {"jpg": big}, {"k.jpg": [(512, len(big)),
                                                             (9000, len(big))]}) == [("jpg", big)]
    assert tars.locate_members("k", {"jpg": big},
                               {"k.jpg": [(512, len(big) + 1)]}) == [("jpg", big)]


def test_member_offsets_of_webdataset_and_gnu_tars(tmp_path):
    """webdataset's TarWriter (and so img2dataset) puts a pax header before every member: all of
    them are indexed, as tarfile sees them; a GNU long name ('L' record) is still left out."""
    import tarfile

    import webdataset

    path = tmp_path / "wds.tar"
    with webdataset.TarWriter(str(path)) as writer:
        for i in range(5):
            writer.write({
                "__key__": f"s{i}", "jpg": bytes([i]) * (5000 + i), "txt": f"caption {i}".encode()
            })
    with tarfile.open(path) as archive:
        truth = {m.name: (m.offset_data, m.size) for m in archive.getmembers()}
        assert archive.pax_headers == {} and any(m.pax_headers for m in archive.getmembers())
    with open(path, "rb") as raw:
        assert tars.tar_member_offsets(raw) == {name: [where] for name, where in truth.items()}
    gnu = tmp_path / "gnu.tar"
    with tarfile.open(gnu, "w", format=tarfile.GNU_FORMAT) as archive:
        for name in ("short.jpg", "l" * 130 + ".jpg"):
            info = tarfile.TarInfo(name)
            info.size = 600
            archive.addfile(info, io.BytesIO(b"x" * 600))
    with open(gnu, "rb") as raw:
        assert set(tars.tar_member_offsets(raw)) == {"short.jpg"}


def test_a_member_that_changed_after_it_was_read_stops_the_write():
    big = b"j" * (tars.INLINE_MEMBER_BYTES + 1)
    located = tars.locate_members("k", {"jpg": big}, {"k.jpg": [(0, len(big))]})
    assert isinstance(located[0][1], tuple)
    changed = b"J" + big[1:]
    with pytest.raises(IOError, match="changed since it was read"):
        tars.read_members(located, lambda offset, size: changed[offset:offset + size])


# --- the Beam job on real shards ----------------------------------------------------------------

@pytest.fixture(scope="module")
def balanced_coco_mini(coco_mini_shards, tmp_path_factory):
    """coco_mini annotated (2 workers) and balanced: (input glob, annotations dir, solution path).
    """
    work = tmp_path_factory.mktemp("resample_coco_mini")
    annotate.run(
        ["--input", coco_mini_shards.glob, "--output",
         str(work / "annotations"), *TWO_WORKERS])
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
            str(p) for p in (output / "release").glob("*.tar")), shardshuffle=False)
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
                         output_size=250, input_glob=[coco_mini_shards.glob,
                                                      str(extra[0])])
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


def test_exact_thresholds_from_windows_equal_the_k_smallest_of_all_draws():
    """RankCandidates sends only the draws near each signature's k/n and counts the rest; the merged
    threshold is still the k-th smallest (draw, key) of all the signature's rows, sorted here."""
    import pyarrow as pa

    from pipeline import decide
    from pipeline.errors import DataError

    keys = [f"u{i:06d}" for i in range(200_000)]
    signature_of = ["a" if i % 4 else "b" for i in range(len(keys))]
    rows = Counter(signature_of)
    keep = {"a": int(rows["a"] * 0.9), "b": int(rows["b"] * 0.3)}

    class Rule:  # the solution's part RankCandidates uses: a signature per row, its (n_s, k_s)
        def table_signatures(self, table):
            per_row = [concepts[0] for concepts in table.column("concepts").to_pylist()]
            signatures = sorted(set(per_row))
            return (np.array([signatures.index(s) for s in per_row]), signatures,
                    np.full(len(signatures), 0.5))

        def exact_signature(self, signature):
            return rows[signature], keep[signature]

    ranker = decide.RankCandidates(5, "exact")
    ranker.rule = lambda _: Rule()
    parts = []
    for start in range(0, len(keys), 7000):
        chunk = slice(start, start + 7000)
        table = pa.table({
            "key": keys[chunk], "attributes": [[] for _ in keys[chunk]],
            "concepts": [[s] for s in signature_of[chunk]], "utility": [None for _ in keys[chunk]]
        })
        parts += list(ranker.process(table, "solution text"))
    # merged the way the runner may: each worker its own bundles, then the workers' accumulators
    merge = decide.MergeWindows()
    accumulators = [merge.create_accumulator(), merge.create_accumulator()]
    for i, (signature, part) in enumerate(parts):
        if signature == "a":
            accumulators[i % 2] = merge.add_input(accumulators[i % 2], part)
    by_signature = {"a": merge.extract_output(merge.merge_accumulators(accumulators))}
    b = merge.create_accumulator()
    for signature, part in parts:
        if signature == "b":
            b = merge.add_input(b, part)
    by_signature["b"] = merge.extract_output(b)
    thresholds = dict(
        decide.threshold(signature, merged) for signature, merged in by_signature.items())
    for signature in ("a", "b"):
        draws = sorted((hashing.keyed_uniform(5, key), key) for key, s in zip(keys, signature_of)
                       if s == signature)
        assert tuple(thresholds[signature]) == draws[keep[signature] - 1]
    assert sum(len(window) for _, (_, _, window) in parts) < len(keys) / 20, (
        "most draws are only counted"
    )
    with pytest.raises(DataError, match="outside its window"):
        decide.threshold("a", (10, 10, [(0.5, "k")]))
