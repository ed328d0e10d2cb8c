"""Keyed-hash sampling and the keep rule: draws, Bernoulli and repeat copies, a solution applied
to rows and to Arrow tables, and exact mode's per-signature thresholds merged from windows.
"""
from collections import Counter

import numpy as np
import pytest

from pipeline import hashing, release
from pipeline.signatures import SignatureTable
from solvers.solution import BalanceSolution


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


def test_keyed_uniform_is_the_documented_blake2b_draw():
    """DESIGN.md's draw, computed here from hashlib: blake2b keyed with "SEED:PURPOSE" over the
    key's UTF-8, 8 bytes, the top 53 bits over 2**53 (what releases made before stay equal to)."""
    import hashlib

    for seed, purpose in ((0, hashing.KEEP), (7, hashing.ORDER), (2**62, hashing.REPEAT),
                          (7, hashing.KEEP)):
        for key in ("a", "k-1", "ключ", "x" * 300, ""):
            digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8,
                                     key=f"{seed}:{purpose}".encode("utf-8")).digest()
            expected = (int.from_bytes(digest, "big") >> 11) / 2.0**53
            assert hashing.keyed_uniform(seed, key, purpose) == expected


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
    # the separator search reads string data buffers: both string layouts, whole and sliced
    for rows, labels in [(label_sets[:-1], pa.string()), (label_sets, pa.string()),
                         (label_sets, pa.large_string()), (label_sets[:-1], pa.large_string())]:
        rows = rows * 3
        table = pa.table({"key": [f"k{i}" for i in range(len(rows))],
                          "attributes": pa.array([a for a, _ in rows], pa.list_(labels)),
                          "concepts": pa.array([c for _, c in rows], pa.list_(labels)),
                          "utility": pa.array([None] * len(rows), pa.float64())})
        if labels == pa.string():
            table = pa.concat_tables([table.slice(0, 5), table.slice(5)])
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


def test_label_set_memo_makes_each_value_once_and_starts_again_at_its_limit():
    """records.LabelSetMemo (KeepRule's signatures, dedup.LabelSetCounts, the image path's
    combined labels): one make() per label set until the limit, then emptied, never grown past it.
    """
    from pipeline.records import LabelSetMemo

    made = []
    memo = LabelSetMemo(limit=3)
    make = lambda key: lambda: made.append(key) or f"value-{key}"  # noqa: E731
    assert [memo.get_or_make(key, make(key)) for key in "abab"] == ["value-a", "value-b"] * 2
    assert made == ["a", "b"]
    for key in "cdef":
        assert memo.get_or_make(key, make(key)) == f"value-{key}"
        assert len(memo) <= 3
    assert made == ["a", "b", "c", "d", "e", "f"] and set(memo) == {"d", "e", "f"}
    assert memo.get_or_make("a", make("a")) == "value-a" and made[-1] == "a"
