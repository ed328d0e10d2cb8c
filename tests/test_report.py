"""The report: statistics before / planned / realized, the HTML page and the dataset card.

Built from small signature tables solved by the real solver; no Beam pipeline needed.
"""
import base64
import json
import re

import pytest

from pipeline import balance, report
from pipeline.signatures import SignatureTable

MAN, WOMAN = "perceived_gender:man", "perceived_gender:woman"


def _records(scale=1):
    rows = [([MAN], ["kitchen"], 30), ([WOMAN], ["kitchen"], 90), ([MAN], ["office"], 80),
            ([WOMAN], ["office"], 40), ([MAN], [], 60), ([WOMAN], [], 60), ([], [], 100)]
    return [{"attributes": a, "concepts": c, "utility": None, "count": n * scale} for a, c, n in rows]


@pytest.fixture(scope="module")
def solved():
    records = _records()
    table = SignatureTable.from_records(records)
    solution, _ = balance.solve_table(table, balance.BalanceConfig(keep_rate=0.6, min_support=10, method="exact"))
    return solution, table.to_records()


def _manifest(kept_total, mode="bernoulli"):
    return {"format": "webdataset", "prefix": "balanced", "samples_per_shard": 1000, "mode": mode, "seed": 5,
            "solution_digest": "abc", "total_bytes": 1234,
            "shards": [{"name": "balanced-00000.tar", "samples": kept_total, "bytes": 1234, "sha256": "x"}],
            "counts": {"samples_read": 460, "kept": kept_total, "dropped": 460 - kept_total,
                       "output_samples": kept_total, "quarantined": {}, "quarantined_total": 0}}


def test_statistics_before_planned_and_realized(solved):
    solution, records = solved
    # A release that kept exactly 30 of each (value, concept) cell and of the rest.
    kept = [{"attributes": a, "concepts": c, "utility": None, "count": n} for a, c, n in (
        ([MAN], ["kitchen"], 30), ([WOMAN], ["kitchen"], 30), ([MAN], ["office"], 40), ([WOMAN], ["office"], 40),
        ([MAN], [], 50), ([WOMAN], [], 50), ([], [], 36))]
    stats = report.build_statistics(solution, records, kept, _manifest(276),
                                    {"quarantined_by_reason": {"empty_caption": 2}})
    before = stats["shares"]["before"]["concepts"]["kitchen"]
    assert before["shares"][WOMAN] == pytest.approx(0.75) and before["support"]["perceived_gender"] == 120
    realized = stats["shares"]["realized"]["concepts"]
    assert realized["kitchen"]["shares"][WOMAN] == pytest.approx(0.5)
    assert realized["office"]["support"]["perceived_gender"] == 80
    head = report.headline(stats)
    assert head["before"]["association_bias_max"] == pytest.approx(0.25)
    assert head["planned"]["association_bias_max"] <= 0.02 + 1e-6
    assert head["realized"]["association_bias_max"] == pytest.approx(0.0)
    assert stats["rows"]["rate_kept"] == pytest.approx(276 / 460)
    # Gaps left to their defaults are shown as the numbers the solver enforced, not as null.
    assert stats["gaps"] == {"representation": 0.02, "association": 0.02, "constraint_form": "share"}
    assert stats["quarantine"]["annotate"] == {"empty_caption": 2}
    assert sum(stats["q_distribution"]["rows"]) == pytest.approx(460)


def test_annotation_coverage_before_planned_and_realized(solved):
    solution, records = solved
    kept = [{"attributes": a, "concepts": c, "utility": None, "count": n} for a, c, n in (
        ([MAN], ["kitchen"], 30), ([WOMAN], ["kitchen"], 30), ([], [], 36))]
    stats = report.build_statistics(solution, records, kept, _manifest(96))
    coverage = stats["annotation_coverage"]
    assert coverage["before"] == {"perceived_gender": pytest.approx(360 / 460)}  # 100 rows say nobody
    assert coverage["realized"] == {"perceived_gender": pytest.approx(60 / 96)}
    # The plan's own keep probabilities: Clarabel's primal q on the solved rows (the report applies
    # the duals with q_for; the two agree only if both are right).
    planned, projected = balance.solve_table(SignatureTable.from_records(records),
                                             balance.BalanceConfig(keep_rate=0.6, min_support=10, method="exact"))
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
    assert warning.replace("perceived_gender", "perceived\\_gender") in card  # names are Markdown-escaped
    page = report.render_html(stats, _manifest(140))
    assert "Annotation coverage" in page and "28.6%" in page and "only 29% of the released rows" in page


def test_weights_mode_realized_statistics_use_the_weights(solved):
    solution, records = solved
    stats = report.build_statistics(solution, records, records, _manifest(460, mode="weights"))
    # Every row kept with weight q/eta: the realized shares are the planned ones.
    assert report.headline(stats)["realized"] == pytest.approx(report.headline(stats)["planned"])


def test_html_is_self_contained_with_decodable_plots(solved):
    solution, records = solved
    stats = report.build_statistics(solution, records, records, _manifest(460))
    page = report.render_html(stats, _manifest(460))
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
        json.dumps({"signature": [r["attributes"], r["concepts"], None], "count": r["count"]}) + "\n"
        for r in records))
    assert report.run(["--solution", str(tmp_path / "solution.json"), "--release", str(release_dir)]) == 0
    assert {p.name for p in release_dir.iterdir()} >= {"stats.json", "report.html", "README.md"}
