"""Nothing unsafe: hostile keys read back whole by every reader, table readers that keep going
after a bad row, and utility values that are bad but never drop a row.

Each test checks the files a job wrote with other readers (webdataset, tarfile), not the job's own
bookkeeping.
"""
import json
import math
import tarfile

import pytest
import webdataset

from pipeline import annotate, cli, release, sources, table_sources
from pipeline import quarantine as quarantine_module
from pipeline.keys import safe_key
from caption_rows import balanced_rows, write_jsonl

HOSTILE_KEYS = [
    "../../evil", "a.b.c", "a.b.d", ".", "..", "nul\x00key", "x" * 300, "plain", "with/slash",
    "back\\slash", "tilde~", "100%", "line\nbreak", "é.jpg"
]


# --- keys -----------------------------------------------------------------------------------------

def test_safe_keys_are_unique_bounded_and_reversible_where_short():
    from urllib.parse import unquote

    encoded = [safe_key(key) for key in HOSTILE_KEYS]
    assert len(set(encoded)) == len(HOSTILE_KEYS)
    for key, name in zip(HOSTILE_KEYS, encoded):
        assert "." not in name and "/" not in name and "\\" not in name and "\x00" not in name
        assert name not in ("", ".", "..") and len(name.encode("utf-8")) <= 200
        assert name.isprintable()
        if len(key) < 60:
            assert unquote(name) == key
    assert safe_key("plain") == "plain" and safe_key("0a1b2c") == "0a1b2c"


@pytest.fixture(scope="module")
def hostile_release(tmp_path_factory):
    work = tmp_path_factory.mktemp("hostile_keys")
    table = write_jsonl(work / "captions.jsonl", balanced_rows(HOSTILE_KEYS))
    output = work / "run"
    assert cli.main(["run", "--input", str(table), "--output", str(output), "--keep-rate", "1",
                     "--min-support", "1", "--samples-per-shard", "5"]) == 0
    return output / "release"


def test_a_release_with_hostile_keys_reads_back_whole_in_every_reader(hostile_release, tmp_path):
    manifest = json.loads((hostile_release / "manifest.json").read_text())
    kept = manifest["counts"]["output_samples"]
    assert kept == len(HOSTILE_KEYS) and manifest["counts"]["quarantined_total"] == 0
    shards = sorted(str(p) for p in hostile_release.glob("*.tar"))
    # webdataset: every sample intact (a txt and a json each), keys distinct
    samples = list(webdataset.WebDataset(shards, shardshuffle=False))
    assert len(samples) == kept and len({s["__key__"] for s in samples}) == kept
    assert all(set(s) >= {"txt", "json"} for s in samples)
    # the original key of every record is in its json
    assert sorted(json.loads(s["json"])["key"] for s in samples) == sorted(HOSTILE_KEYS)
    # tarfile: extraction stays inside the folder and makes one file per member
    target = tmp_path / "extracted"
    for shard in shards:
        with tarfile.open(shard) as archive:
            archive.extractall(target, filter="data")
    extracted = [p for p in target.rglob("*") if p.is_file()]
    assert len(extracted) == 2 * kept and not list(tmp_path.parent.glob("evil*"))
    assert all(target in p.resolve().parents for p in extracted)
    # balancebeam's own reader
    read, entries = [], []
    for shard in shards:
        with open(shard, "rb") as handle:
            samples, bad = _read_all(sources.iter_tar_samples(handle, shard))
        read, entries = read + samples, entries + bad
    assert len(read) == kept and entries == []


def test_tar_keys_with_dots_get_their_real_reason(tmp_path):
    import io

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in (("a.b.jpg", b"not read"), ("a.b.txt", b"a man")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    buffer.seek(0)
    outputs = list(sources.iter_tar_samples(buffer, "dots.tar"))
    assert len(outputs) == 1
    entry = outputs[0].value
    assert entry["reason"] == quarantine_module.INVALID_KEY
    assert "must not contain '.'" in entry["detail"]


# --- table readers --------------------------------------------------------------------------------

def _read_all(iterator):
    samples, entries = [], []
    for output in iterator:
        (entries.append(output.value) if hasattr(output, "tag") else samples.append(output))
    return samples, entries


def test_csv_keeps_reading_after_a_huge_field_and_reports_an_unterminated_quote(tmp_path):
    path = tmp_path / "table.csv"
    huge = "x" * (table_sources.MAX_CSV_FIELD + 10)
    path.write_text("key,caption\n"
                    "k0,a man\n"
                    f"k1,{huge}\n"
                    "k2,a woman\n"
                    "k3,a dog\n"
                    'k4,"never closed\n'
                    "k5,swallowed\n"
                    "k6,swallowed too\n")
    with open(path, "rb") as handle:
        samples, entries = _read_all(
            table_sources.iter_csv_samples(handle, str(path), "key", "caption"))
    assert [s["key"] for s in samples] == ["k0", "k2", "k3"]
    assert [(e["reason"], e["position"]) for e in entries] == [("bad_row", 1), ("bad_row", 4)]
    assert "field larger than field limit" in entries[0]["detail"]
    assert "never closed" in entries[1]["detail"] and "lines 6-8" in entries[1]["detail"]


def test_csv_fields_up_to_the_limit_are_read_whole(tmp_path):
    path = tmp_path / "table.csv"
    caption = "a man " + "y" * 200_000  # above csv's own 128 KiB default
    path.write_text(f"key,caption\nk0,{caption}\nk1,a woman\n")
    with open(path, "rb") as handle:
        samples, entries = _read_all(
            table_sources.iter_csv_samples(handle, str(path), "key", "caption"))
    assert entries == [] and [s["caption"] for s in samples] == [caption, "a woman"]


# --- utility --------------------------------------------------------------------------------------

def test_bad_utility_values_count_as_missing_and_are_never_dropped(tmp_path):
    scores = [0.2, 0.9, "nan", float("nan"), float("inf"), "-inf", "abc", None, True, 0.5, 0.7, 0.1]
    rows = balanced_rows([f"k{i}" for i in range(len(scores))])
    for row, score in zip(rows, scores):
        if score is not None:
            row["score"] = score
    table = write_jsonl(tmp_path / "scored.jsonl", rows)
    output = tmp_path / "out"
    assert cli.main(["run", "--input", str(table), "--output", str(output), "--keep-rate", "0.9",
                     "--utility-field", "score", "--utility-tilt", "0.5", "--mode", "weights",
                     "--min-support", "1"]) == 0
    annotations = {
        r["key"]: r["utility"]
        for r in annotate.read_annotations(output / "annotations").to_pylist()
    }
    expected = {f"k{i}": (float(s) if isinstance(s, float) and math.isfinite(s) else None)
                for i, s in enumerate(scores)}
    assert annotations == expected
    counts = json.loads((output / "annotations" / "counts.json").read_text())
    assert counts["utility_missing"] == sum(value is None for value in expected.values()) == 7
    manifest = json.loads((output / "release" / "manifest.json").read_text())
    # weights mode keeps every q > 0, scored or not
    assert manifest["counts"]["kept"] == len(scores)


def test_keep_probability_is_a_function_of_the_row_not_of_which_row_came_first():
    from pipeline.signatures import SignatureTable
    from solvers import solve
    from solvers.problem import BalanceProblem

    table = SignatureTable.from_records([
        {"attributes": ["g:man"], "concepts": ["c"], "utility": 0.2, "count": 60},
        {"attributes": ["g:woman"], "concepts": ["c"], "utility": 0.8, "count": 40},
        {"attributes": ["g:man"], "concepts": [], "utility": 0.5, "count": 40},
        {"attributes": ["g:woman"], "concepts": [], "utility": None, "count": 60},
    ])
    problem = BalanceProblem(table.attributes, table.concepts, groups=table.groups, keep_rate=0.7,
                             weights=table.weights, utility=table.utility, utility_tilt=0.3,
                             min_support=1, attribute_names=table.attribute_names,
                             concept_names=table.concept_names, group_names=table.group_names)
    solution = solve(problem, method="exact")
    rows = [(["g:man"], ["c"], 0.201), (["g:man"], ["c"], 0.204), (["g:man"], ["c"], 0.196)]
    first = release.KeepRule(solution, seed=1)
    second = release.KeepRule(solution, seed=1)
    forward = [first.keep_probability(*row) for row in rows]
    backward = [second.keep_probability(*row) for row in reversed(rows)][::-1]
    assert forward == backward and len(set(forward)) == 1  # one signature (bucket 0.20), one q
