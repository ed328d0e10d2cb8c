"""The report: statistics before / planned / realized, the HTML page and the dataset card.

Built from small signature tables solved by the real solver; no Beam pipeline needed.
"""
import base64
import json
import re

import pytest
from report_checks import check_page_against_stats, shown_stats

from pipeline import plan, report, report_concepts
from pipeline.signatures import SignatureTable

MAN, WOMAN = "perceived_gender:man", "perceived_gender:woman"


def _records(scale=1):
    rows = [([MAN], ["kitchen"], 30), ([WOMAN], ["kitchen"], 90), ([MAN], ["office"], 80),
            ([WOMAN], ["office"], 40), ([MAN], [], 60), ([WOMAN], [], 60), ([], [], 100)]
    return [{"attributes": a, "concepts": c, "utility": None, "count": n * scale}
            for a, c, n in rows]


@pytest.fixture(scope="module")
def solved():
    records = _records()
    table = SignatureTable.from_records(records)
    solution, _ = plan.solve_table(
        table, plan.BalanceConfig(keep_rate=0.6, min_support=10, method="exact"))
    return solution, table.to_records()


def _manifest(kept_total, mode="bernoulli"):
    return {
        "format": "webdataset", "prefix": "balanced", "samples_per_shard": 1000, "mode": mode,
        "seed": 5, "solution_digest": "abc", "total_bytes": 1234, "shards": [{
            "name": "balanced-00000.tar", "samples": kept_total, "bytes": 1234, "sha256": "x"
        }], "counts": {
            "samples_read": 460, "kept": kept_total, "dropped": 460 - kept_total,
            "output_samples": kept_total, "quarantined": {}, "quarantined_total": 0
        }
    }


def test_statistics_before_planned_and_realized(solved):
    solution, records = solved
    # A release that kept exactly 30 of each (value, concept) cell and of the rest.
    kept = [{"attributes": a, "concepts": c, "utility": None, "count": n}
            for a, c, n in (([MAN], ["kitchen"], 30), ([WOMAN], ["kitchen"], 30),
                            ([MAN], ["office"], 40), ([WOMAN], ["office"], 40), ([MAN], [], 50),
                            ([WOMAN], [], 50), ([], [], 36))]
    stats = report.build_statistics(solution, records, kept, _manifest(276),
                                    {"quarantined_by_reason": {"empty_caption": 2}})
    before = stats["shares"]["before"]["concepts"]["kitchen"]
    assert before["shares"][WOMAN] == pytest.approx(0.75)
    assert before["support"]["perceived_gender"] == 120
    realized = stats["shares"]["realized"]["concepts"]
    assert realized["kitchen"]["shares"][WOMAN] == pytest.approx(0.5)
    assert realized["office"]["support"]["perceived_gender"] == 80
    head = report.headline(stats)
    assert head["before"]["association_bias_max"] == pytest.approx(0.25)
    assert head["planned"]["association_bias_max"] <= 0.02 + 1e-6
    assert head["realized"]["association_bias_max"] == pytest.approx(0.0)
    assert stats["rows"]["rate_kept"] == pytest.approx(276 / 460)
    # Gaps left to their defaults are shown as the numbers the solver enforced, not as null.
    assert stats["gaps"] == {
        "representation": 0.02, "association": 0.02, "constraint_form": "share"
    }
    assert stats["quarantine"]["annotate"] == {"empty_caption": 2}
    assert sum(stats["q_distribution"]["rows"]) == pytest.approx(460)


def test_annotation_coverage_before_planned_and_realized(solved):
    solution, records = solved
    kept = [{"attributes": a, "concepts": c, "utility": None, "count": n} for a, c, n in (
        ([MAN], ["kitchen"], 30), ([WOMAN], ["kitchen"], 30), ([], [], 36))]
    stats = report.build_statistics(solution, records, kept, _manifest(96))
    coverage = stats["annotation_coverage"]
    # 100 rows say nobody
    assert coverage["before"] == {"perceived_gender": pytest.approx(360 / 460)}
    assert coverage["realized"] == {"perceived_gender": pytest.approx(60 / 96)}
    # The plan's own keep probabilities: Clarabel's primal q on the solved rows (the report applies
    # the duals with q_for; the two agree only if both are right).
    planned, projected = plan.solve_table(
        SignatureTable.from_records(records),
        plan.BalanceConfig(keep_rate=0.6, min_support=10, method="exact"))
    kept_weight = projected.weights * planned.q
    annotated = projected.attributes.max(axis=1) > 0
    expected = kept_weight[annotated].sum() / kept_weight.sum()
    assert coverage["planned"]["perceived_gender"] == pytest.approx(expected)
    assert report.coverage_warnings(stats) == []  # 62% of the release is annotated


def test_low_annotation_coverage_is_said_in_the_card_and_the_page(solved):
    solution, records = solved
    kept = [{"attributes": a, "concepts": c, "utility": None, "count": n} for a, c, n in (
        ([MAN], ["kitchen"], 20), ([WOMAN], ["kitchen"], 20), ([], [], 100))]
    stats = report.build_statistics(solution, records, kept, _manifest(140))
    [warning] = report.coverage_warnings(stats)
    assert warning.startswith("only 29% of the released rows have a perceived_gender annotation")
    assert "the other 71%" in warning
    card = report.dataset_card(stats, _manifest(140), solution)
    # names are Markdown-escaped
    assert warning.replace("perceived_gender", "perceived\\_gender") in card
    page = report.render_html(stats)
    assert "Annotation coverage" in page and "28.6%" in page
    assert "only 29% of the released rows" in page


def test_weights_mode_realized_statistics_use_the_weights(solved):
    solution, records = solved
    stats = report.build_statistics(solution, records, records, _manifest(460, mode="weights"))
    # Every row kept with weight q/eta: the realized shares are the planned ones.
    assert report.headline(stats)["realized"] == pytest.approx(report.headline(stats)["planned"])


def test_html_is_self_contained_with_decodable_plots(solved):
    solution, records = solved
    stats = report.build_statistics(solution, records, records, _manifest(460))
    page = report.render_html(stats)
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert len(images) >= 2
    assert all(base64.b64decode(image).startswith(b"\x89PNG\r\n\x1a\n") for image in images)
    assert not re.search(r"(src|href)=['\"]https?:", page)
    assert "Perceived" in page


def test_dataset_card_says_what_perceived_means_and_how_it_was_made(solved):
    solution, records = solved
    stats = report.build_statistics(solution, records, records, _manifest(300))
    card = report.dataset_card(stats, _manifest(300), solution)
    assert "never a person's identity" in card
    assert "seed: 5" in card and "kept: 300" in card and "apache-beam" in card
    assert f"keep rate: {solution.keep_rate:.4f}" in card
    assert "balanced-{00000..00000}.tar" in card
    json.dumps(stats)  # JSON-ready


def test_report_job_writes_its_three_files(solved, tmp_path):
    solution, records = solved
    (tmp_path / "solution.json").write_text(solution.to_json())
    (tmp_path / "signatures.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    release_dir = tmp_path / "release"
    release_dir.mkdir()
    (release_dir / "manifest.json").write_text(json.dumps(_manifest(460)))
    (release_dir / "kept-signatures.jsonl").write_text("".join(
        json.dumps({"signature": [r["attributes"], r["concepts"], None], "count": r["count"]}) +
        "\n" for r in records))
    assert report.run(
        ["--solution", str(tmp_path / "solution.json"), "--release", str(release_dir)]) == 0
    assert {p.name for p in release_dir.iterdir()} >= {"stats.json", "report.html", "README.md"}


# --- per-concept rows, heat map, quarantine and the page as a view of stats.json ------------------

WOMAN_SHARE_BEFORE = {
    "kitchen": 140 / 200, "office": 40 / 120, "beard": 0.0, "tiara": 1.0, "bride": 1.0
}


def _mixed_records():
    """kitchen and beard are labels of interest, office a proxy found by balance, tiara too rare to
    balance, bride exempted; beard (all men) can only meet a 5% gap by being dropped."""
    rows = [([MAN], ["kitchen"], 60), ([WOMAN], ["kitchen"], 140), ([MAN], ["beard"], 66),
            ([MAN], ["office"], 80), ([WOMAN], ["office"], 40), ([WOMAN], ["tiara"], 3),
            ([WOMAN], ["bride"], 30), ([MAN], [], 400), ([WOMAN], [], 330), ([], [], 1000)]
    return [{"attributes": a, "concepts": c, "utility": None, "count": n} for a, c, n in rows]


@pytest.fixture(scope="module")
def mixed():
    records = _mixed_records()
    config = plan.BalanceConfig(keep_rate=0.8, association_gap=0.05, min_support=10, method="exact",
                                concepts=["kitchen", "beard", "tiara"], proxies=1,
                                unconstrained=["bride"])
    solution, _ = plan.solve_table(SignatureTable.from_records(records), config)
    # What a release of that plan could hold (its signatures know the solution's concepts only).
    kept = [{"attributes": a, "concepts": c, "utility": None, "count": n}
            for a, c, n in (([MAN], ["kitchen"], 60), ([WOMAN], ["kitchen"], 66),
                            ([MAN], ["office"], 40), ([WOMAN], ["office"], 40),
                            ([WOMAN], ["tiara"], 3), ([WOMAN], [], 30 + 300), ([MAN], [], 380),
                            ([], [], 800))]
    total = sum(r["count"] for r in kept)
    manifest = _manifest(total)
    manifest["counts"].update(samples_read=2149, dropped=2149 - total)
    return solution, records, kept, report.build_statistics(solution, records, kept, manifest)


def test_every_concept_has_its_status_support_shares_and_rows_kept(mixed):
    solution, _, _, stats = mixed
    rows = {row["concept"]: row for row in stats["concepts"]}
    assert [row["concept"]
            for row in stats["concepts"]] == ["kitchen", "office", "beard", "bride", "tiara"]
    assert {name: row["status"]
            for name, row in rows.items()} == {
                "kitchen": "constrained", "office": "proxy", "beard": "dropped",
                "tiara": "low_support", "bride": "exempt"
            }
    for name, share in WOMAN_SHARE_BEFORE.items():
        assert rows[name]["shares"]["before"][WOMAN] == pytest.approx(share), name
        assert rows[name]["gap"]["before"] == pytest.approx(abs(share - 0.5)), name
    assert rows["kitchen"]["support"] == {"perceived_gender": 200}
    assert rows["tiara"]["support"]["perceived_gender"] == 3
    # realized: counted in the kept signatures by hand
    assert rows["kitchen"]["shares"]["realized"][WOMAN] == pytest.approx(66 / 126)
    assert rows["kitchen"]["rows"]["realized"] == 126 and rows["office"]["rows"]["realized"] == 80
    assert rows["beard"]["rows"]["realized"] == 0 and rows["beard"]["shares"]["realized"][
        MAN] is None
    # the release does not record an exempt concept: no realized numbers, rather than wrong ones
    assert rows["bride"]["shares"]["realized"] == {MAN: None, WOMAN: None}
    assert rows["bride"]["rows"]["realized"] is None
    # planned: the report's q (from the duals) against the solver's own primal q
    after = solution.statistics["data_bias_after"]["concepts"]
    for name in ("kitchen", "office"):
        assert rows[name]["shares"]["planned"][WOMAN] == pytest.approx(
            after[name]["shares"][WOMAN], abs=1e-5)
        assert rows[name]["gap"]["planned"] <= 0.05 + 1e-6
    # the words: dropped and exempt concepts are explained, not only marked
    assert "'beard': all 66 annotated rows are 'man'" in rows["beard"]["note"]
    assert "--unconstrained-concepts" in rows["bride"]["note"] and "fewer than 10" in rows["tiara"][
        "note"]
    assert "proxy" in rows["office"]["note"]


def test_the_heat_map_holds_the_constrained_concepts_that_moved_most(mixed):
    _, _, _, stats = mixed
    # gaps 0.5, 0.2, 0.167 before
    assert stats["heatmap"]["concepts"] == ["beard", "kitchen", "office"]
    assert report.plot_heatmaps(stats)
    many = [{"concept": f"c{i:02d}", "status": "constrained", "gap": {"before": i / 100}}
            for i in range(45)]
    ranked = report_concepts.heatmap_concepts(many)
    assert len(ranked) == report.HEATMAP_MAX_CONCEPTS == 30 and ranked[:2] == ["c44", "c43"]


def test_the_page_shows_only_numbers_that_are_in_stats_json(mixed):
    stats = mixed[3]
    page = report.render_html(stats)
    shown = shown_stats(page)
    # headline, bias, coverage, every concept cell
    assert check_page_against_stats(shown, stats) > 5 * 12
    paths = {tuple(path) for path, _ in shown}
    assert ("rows", "input_records") in paths and ("max_keep_rate",) in paths
    assert ("concepts", 2, "shares", "realized", WOMAN) in paths  # beard: 'n/a', checked as missing
    assert 'data-concept="beard" data-status="dropped"' in page
    dropped = ("Dropped by the plan:</strong> &#39;beard&#39;: all 66 annotated rows are "
               "&#39;man&#39;")
    assert dropped in page
    assert "every constrained value is within its gap" in page
    assert page.count(
        "<tr data-concept=") == 5 and 'id="concept-filter"' in page and "<script>" in page


def test_names_from_the_data_are_escaped_in_the_page(mixed):
    _, records, kept, _ = mixed
    name = "<img src=x onerror=alert(1)> & \"quotes\" 'too'"
    records = [{**r, "concepts": [name if c == "kitchen" else c for c in r["concepts"]]}
               for r in records]
    config = plan.BalanceConfig(keep_rate=0.8, association_gap=0.05, min_support=10, method="exact")
    solution, _ = plan.solve_table(SignatureTable.from_records(records), config)
    stats = report.build_statistics(solution, records, kept,
                                    _manifest(sum(r["count"] for r in kept)))
    page = report.render_html(stats)
    assert "<img src=x" not in page
    assert "&lt;img src=x onerror=alert(1)&gt; &amp; &#34;quotes&#34; &#39;too&#39;" in page


def _quarantine_line(key, shard, position, stage, reason):
    return json.dumps({
        "key": key, "shard": shard, "position": position, "stage": stage, "reason": reason,
        "detail": f"{reason} at {position}"
    }) + "\n"


def test_quarantine_by_stage_and_reason_with_example_keys(solved, tmp_path):
    solution, records = solved
    (tmp_path / "solution.json").write_text(solution.to_json())
    (tmp_path / "signatures.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    annotations, release_dir = tmp_path / "annotations", tmp_path / "release"
    (release_dir / "quarantine").mkdir(parents=True)
    annotations.mkdir()
    # annotate: 7 empty captions over two files, out of order, and one corrupt tar without a key
    (annotations / "quarantine-00000-of-00002.jsonl").write_text("".join(
        _quarantine_line(f"k{i}", "/data/b.tar", i, "annotate", "empty_caption")
        for i in (6, 2, 5)))
    (annotations / "quarantine-00001-of-00002.jsonl").write_text("".join(
        _quarantine_line(f"k{i}", "/data/a.tar", i, "annotate", "empty_caption")
        for i in (3, 0, 4, 1)) + _quarantine_line(None, "/data/c.tar", None, "read", "corrupt_tar"))
    (annotations / "counts.json").write_text(
        json.dumps({"quarantined_by_reason": {"empty_caption": 7, "corrupt_tar": 1}}))
    (release_dir / "quarantine" / "resample-00000-of-00001.jsonl").write_text("".join(
        _quarantine_line(f"k{i}", "/data/a.tar", i, "resample", "not_annotated") for i in range(2)))
    manifest = _manifest(450)
    manifest["counts"].update(dropped=8, quarantined={"resample:not_annotated": 2},
                              records_quarantined=2, input_records=460)
    (release_dir / "manifest.json").write_text(json.dumps(manifest))
    (release_dir / "kept-signatures.jsonl").write_text("".join(
        json.dumps({"signature": [r["attributes"], r["concepts"], None], "count": r["count"]}) +
        "\n" for r in records))
    stats = report.report(str(tmp_path / "solution.json"), str(tmp_path / "signatures.jsonl"),
                          str(release_dir), str(annotations))
    table = [(e["job"], e["stage"], e["reason"], e["count"], [x["key"] for x in e["examples"]])
             for e in stats["quarantine_table"]]
    assert table == [("annotate", "annotate", "empty_caption", 7, ["k0", "k1", "k3", "k4", "k2"]),
                     ("annotate", "read", "corrupt_tar", 1, [None]),
                     ("resample", "resample", "not_annotated", 2, ["k0", "k1"])]
    # the file's name, not its path
    assert stats["quarantine_table"][1]["examples"][0]["shard"] == "c.tar"
    assert stats["rows"]["quarantined"] == 2 and stats["rows"]["input_records"] == 460
    assert json.loads(
        (release_dir / "stats.json").read_text())["quarantine_table"] == stats["quarantine_table"]
    page = (release_dir / "report.html").read_text()
    assert '<tr data-reason="empty_caption">' in page and "<code>c.tar</code>" in page
    assert 'title="empty_caption at 0"><code>k0</code>' in page


def test_a_subset_release_is_reported(solved):
    solution, records = solved
    manifest = {
        "format": "subset", "mode": "exact", "seed": 5, "solution_digest": "abc",
        "total_bytes": 999, "samples_per_shard": None, "files": {
            "subset.npy": {"rows": 276}, "keep.parquet": {"rows": 460, "parts": ["p0", "p1"]}
        }, "counts": {
            "samples_read": 460, "kept": 276, "dropped": 184, "output_samples": 276,
            "quarantined": {}, "quarantined_total": 0, "input_records": 460
        }
    }
    stats = report.build_statistics(solution, records, records, manifest)
    assert stats["release"]["format"] == "subset" and stats["rows"]["quarantined"] == 0
    page = report.render_html(stats)
    assert "subset.npy (276 uids) and keep.parquet (460 rows in 2 part files)" in page
    assert "WebDataset shards" not in page
    # the card's words stay in the card
    assert "subset.npy is DataComp&#39;s subset file" not in page
    assert "DataComp's subset file" in report.dataset_card(stats, manifest, solution)
