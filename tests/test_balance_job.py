"""The balance job: constraint signatures counted in Beam, proxies, targets, and M4 solved on the
counts.

Real annotations (coco_mini shards, the COCO val2017 caption file) through the real annotate job.
"""
import collections
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import annotate, balance, plan
from pipeline.records import ANNOTATION_SCHEMA
from pipeline.signatures import SignatureTable, row_signature

TWO_WORKERS = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]
MAN, WOMAN = "perceived_gender:man", "perceived_gender:woman"


def test_row_signature_is_canonical_and_merges_rows_without_attributes():
    assert row_signature([WOMAN, MAN, WOMAN], ["dog", "cat"]) == row_signature([MAN, WOMAN],
                                                                               ["cat", "dog"])
    assert row_signature([], ["dog"]) == row_signature([], ["kitchen", "oven"])
    assert row_signature([], ["dog"], conditional=False) != row_signature([], ["kitchen"],
                                                                          conditional=False)
    assert row_signature([MAN], [], 0.123456, use_utility=True) == row_signature([MAN], [], 0.12,
                                                                                 use_utility=True)
    # utility unused unless tilted
    assert row_signature([MAN], [], 0.9) == row_signature([MAN], [], 0.1)


def test_projection_merges_rows_that_differ_only_in_dropped_concepts():
    table = SignatureTable.from_records([
        {"attributes": [MAN], "concepts": ["dog", "tie"], "utility": None, "count": 3},
        {"attributes": [MAN], "concepts": ["dog"], "utility": None, "count": 2},
        {"attributes": [WOMAN], "concepts": ["tie"], "utility": None, "count": 5},
    ])
    projected = table.project(["dog"])
    assert projected.concept_names == ["dog"]
    records = sorted(projected.to_records(), key=lambda record: record["attributes"])
    assert records == [{"attributes": [MAN], "concepts": ["dog"], "utility": None, "count": 5},
                       {"attributes": [WOMAN], "concepts": [], "utility": None, "count": 5}]


def _synthetic_table():
    """Men and women equal overall; 'tie' leans strongly man, 'cup' mildly, 'dog' not at all."""
    records = []
    for concept, men, women in (("tie", 90, 10), ("cup", 60, 40), ("dog", 50, 50), ("rare", 4, 0)):
        records += [{"attributes": [MAN], "concepts": [concept], "utility": None, "count": men},
                    {"attributes": [WOMAN], "concepts": [concept], "utility": None, "count": women}]
    records.append({"attributes": [WOMAN], "concepts": [], "utility": None, "count": 104})
    return SignatureTable.from_records(records)


def test_proxy_discovery_ranks_common_skewed_concepts_beyond_the_labels_of_interest():
    table = _synthetic_table()
    proxies = plan.discover_proxies(table, interest=["dog"], k=2, min_support=10)
    assert [p["concept"] for p in proxies] == ["tie", "cup"]
    assert proxies[0]["shares"][MAN] == pytest.approx(0.9)
    proxies = plan.discover_proxies(table, interest=["tie"], k=5, min_support=10)
    assert proxies[0]["concept"] == "cup"
    config = plan.BalanceConfig(concepts=["dog", "unknown"], proxies=1, min_support=10)
    concepts, chosen, not_seen = plan.choose_concepts(table, config)
    assert concepts == ["dog", "tie"] and not_seen == ["unknown"]


def test_targets_parse_names_short_names_and_lists():
    names = [MAN, WOMAN]
    assert plan.parse_targets("uniform", names) == "uniform"
    assert plan.parse_targets("woman=0.6,man=0.4", names).tolist() == [0.4, 0.6]
    assert plan.parse_targets("0.3,0.7", names).tolist() == [0.3, 0.7]
    with pytest.raises(ValueError, match="no share for perceived_gender:man"):
        plan.parse_targets("woman=0.5", names)


def test_solve_table_meets_the_gap_and_reports_exclusions_and_bias():
    table = _synthetic_table()
    config = plan.BalanceConfig(keep_rate=0.5, association_gap=0.02, min_support=10, method="exact")
    solution, projected = plan.solve_table(table, config)
    stats = solution.statistics
    assert stats["excluded_low_support"] == {"perceived_gender": ["rare"]}
    before = stats["data_bias_before"]["summary"]["association_bias_max"]
    after = stats["data_bias_after"]["summary"]["association_bias_max"]
    assert before == pytest.approx(0.4) and after <= 0.02 + 1e-6
    assert stats["expected_rows_kept"] == pytest.approx(0.5 * table.num_rows, rel=1e-6)
    json.loads(solution.to_json())


@pytest.fixture(scope="module")
def coco_mini_annotations(coco_mini_shards, tmp_path_factory):
    output = tmp_path_factory.mktemp("balance_annotations")
    annotate.run(["--input", coco_mini_shards.glob, "--output", str(output), *TWO_WORKERS])
    return output


def test_beam_signature_counts_match_a_direct_count_of_the_annotations(
        coco_mini_annotations, tmp_path):
    table = balance.count_signatures(str(coco_mini_annotations), str(tmp_path / "counts"),
                                     TWO_WORKERS, plan.BalanceConfig())
    rows = annotate.read_annotations(coco_mini_annotations).to_pylist()
    expected = collections.Counter(row_signature(r["attributes"], r["concepts"]) for r in rows)
    got = {row_signature(r["attributes"], r["concepts"]): r["count"] for r in table.to_records()}
    assert got == dict(expected) and table.num_rows == 159
    assert list(tmp_path.iterdir()) == []  # the job's temporary count files are gone


def test_solution_depends_on_signatures_not_on_the_number_of_rows(coco_mini_annotations, tmp_path):
    """Ten copies of every annotation row (new keys): counts scale by ten, the solution is the same.
    """
    table = annotate.read_annotations(coco_mini_annotations)
    copies = [
        table.set_column(0, "key", pa.array([f"{k}-{i}" for k in table.column("key").to_pylist()]))
        for i in range(10)
    ]
    (tmp_path / "ten").mkdir()
    pq.write_table(
        pa.concat_tables(copies).cast(ANNOTATION_SCHEMA),
        tmp_path / "ten" / "annotations-00000.parquet")
    config = plan.BalanceConfig(keep_rate=0.7, min_support=2, method="exact")
    once = balance.balance(str(coco_mini_annotations), str(tmp_path / "once" / "solution.json"),
                           config, TWO_WORKERS)
    config = plan.BalanceConfig(keep_rate=0.7, min_support=20, method="exact")
    ten = balance.balance(str(tmp_path / "ten"), str(tmp_path / "ten-solution" / "solution.json"),
                          config, TWO_WORKERS)
    assert ten.statistics["signatures_counted"] == once.statistics["signatures_counted"]
    assert ten.statistics["rows"] == 10 * once.statistics["rows"]
    np.testing.assert_allclose(ten.q, once.q, atol=1e-6)
    lines = (tmp_path / "once" / balance.SIGNATURES_FILE).read_text().splitlines()
    assert sum(json.loads(line)["count"] for line in lines) == 159


def test_infeasible_keep_rate_fails_with_the_achievable_rate(coco_mini_annotations, tmp_path,
                                                             capsys):
    from pipeline import cli

    code = cli.main([
        "balance", "--annotations", str(coco_mini_annotations), "--output",
        str(tmp_path / "s.json"), "--keep-rate", "0.99", "--min-support", "2", "--method", "exact",
        *TWO_WORKERS
    ])
    message = capsys.readouterr().err.strip()
    assert code == 1 and "0.99" in message and "at most" in message and "Binding" in message
    assert message.count("\n") == 0
    assert not (tmp_path / "s.json").exists()


@pytest.fixture(scope="module")
def coco_val_annotations(shared_data, tmp_path_factory):
    output = tmp_path_factory.mktemp("coco_val_annotations")
    annotate.run([
        "--input", str(shared_data / "coco_val2017_captions.json"), "--output", str(output),
        *TWO_WORKERS
    ])
    return output


def test_coco_val_captions_balanced_at_the_max_keep_rate_within_the_gap(
        coco_val_annotations, tmp_path):
    """The real skew (about twice as many men as women) is brought within 2 points for every
    concept with at least 50 annotated captions. Over every concept of the vocabulary 0.9 is just
    out of reach (the max-rate LP says 0.8987: 'truck' is 93% men), so this asks for the maximum."""
    solution = balance.balance(
        str(coco_val_annotations), str(tmp_path / "solution.json"),
        plan.BalanceConfig(keep_rate="max", association_gap=0.02, min_support=50, method="dual"),
        TWO_WORKERS
    )
    stats = solution.statistics
    assert stats["rows"] == 25014 and 0.85 <= solution.keep_rate < 0.9
    assert stats["data_bias_before"]["summary"]["association_bias_max"] > 0.2
    assert stats["data_bias_after"]["summary"]["association_bias_max"] <= 0.02 + 1e-4
    assert stats["data_bias_after"]["summary"]["representation_bias"] <= 0.02 + 1e-4
    assert len(stats["concepts_of_interest"]) >= 20
    assert stats["signatures_counted"] < 0.5 * stats["rows"]


def test_concept_shares_are_the_weighted_shares_counted_row_by_row():
    """plan.concept_shares (the plan's, the report's and proxy discovery's shares) against a count
    by hand: per group, among the rows annotated in that group, weighted by count * q."""
    records = [
        {"attributes": ["perceived_gender:man"], "concepts": ["kitchen", "dog"], "count": 30},
        {
            "attributes": ["perceived_gender:woman", "perceived_age:adult"],
            "concepts": ["kitchen"], "count": 10
        },
        {"attributes": ["perceived_age:child"], "concepts": ["dog"], "count": 7},
        {"attributes": ["perceived_age:adult"], "concepts": ["dog"], "count": 5},
        {"attributes": [], "concepts": ["kitchen", "boat"], "count": 40},
        {"attributes": ["perceived_gender:woman"], "concepts": [], "count": 12},
    ]
    table = SignatureTable.from_records([{**r, "utility": None} for r in records])
    q = np.linspace(0.3, 1.0, len(table.weights))
    for keep in (None, q):
        shares = plan.concept_shares(table, keep)
        assert set(shares) == {"perceived_gender", "perceived_age"}
        for group, (columns, overall, support, share) in shares.items():
            values = [table.attribute_names[k] for k in columns]
            rows = []  # (labels, concepts, weight) of the signature rows, read back from the table
            for i in range(len(table.weights)):
                labels = {table.attribute_names[k] for k in np.flatnonzero(table.attributes[i])}
                concepts = {table.concept_names[r] for r in np.flatnonzero(table.concepts[i])}
                rows.append(
                    (labels, concepts, table.weights[i] * (1.0 if keep is None else keep[i])))
            in_group = [(labels, concepts, w) for labels, concepts, w in rows
                        if labels & set(values)]
            total = sum(w for _, _, w in in_group)
            assert overall == pytest.approx(
                [sum(w for labels, _, w in in_group if v in labels) / total for v in values])
            for r, concept in enumerate(table.concept_names):
                with_concept = [(labels, w) for labels, concepts, w in in_group
                                if concept in concepts]
                expected_support = sum(w for _, w in with_concept)
                assert support[r] == pytest.approx(expected_support)
                expected = [sum(w for labels, w in with_concept if v in labels) / expected_support
                            if expected_support else 0.0 for v in values]
                assert share[:, r] == pytest.approx(expected)
    assert plan.concept_shares(SignatureTable.from_records(
        [{"attributes": [], "concepts": ["dog"], "utility": None, "count": 3}])) == {}
