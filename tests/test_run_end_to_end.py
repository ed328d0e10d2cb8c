"""`balancebeam run` and `balancebeam demo` end to end on real runners and real data.

coco_mini shards -> release read back with webdataset, byte-identical members, manifest checksums,
data AB of the release itself; COCO val2017 captions -> text-only shards within the gap.
"""
import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import webdataset

from pipeline import cli, resample
from pipeline import release as release_module
from pipeline.annotators.text import annotate_caption
from pipeline.signatures import encode
from solvers import data_bias
from solvers.solution import BalanceSolution

TWO_WORKERS = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]
GAP = 0.02


def _release_samples(release_dir):
    return list(
        webdataset.WebDataset(sorted(str(p) for p in release_dir.glob("*.tar")),
                              shardshuffle=False))


def _release_bias(release_dir, solution, min_support):
    """Data bias computed from the release alone: its captions re-annotated, weighted by
    balance.weight."""
    attributes, concepts, weights = [], [], []
    for sample in _release_samples(release_dir):
        found, found_concepts, _ = annotate_caption(sample["txt"].decode("utf-8"))
        attributes.append(found)
        concepts.append(found_concepts)
        weights.append(json.loads(sample["json"])["balance"]["weight"])
    spec = solution.spec
    return data_bias(encode(attributes, spec.attribute_names), encode(concepts, spec.concept_names),
                     weights=np.array(weights), targets=np.asarray(spec.targets),
                     groups=spec.groups, min_support=min_support,
                     attribute_names=spec.attribute_names, concept_names=spec.concept_names,
                     group_names=spec.group_names)


@pytest.fixture(scope="session")
def coco_mini_run(coco_mini_shards, tmp_path_factory):
    output = tmp_path_factory.mktemp("run_coco_mini")
    code = cli.main([
        "run", "--input", coco_mini_shards.glob, "--output", str(output), "--keep-rate", "0.7",
        "--min-support", "2", "--samples-per-shard", "50", "--method", "exact", *TWO_WORKERS
    ])
    assert code == 0
    return output


def test_run_release_reads_back_with_every_member_byte_identical(coco_mini_run, coco_mini_shards):
    originals = {r["key"]: r for r in coco_mini_shards.records}
    samples = _release_samples(coco_mini_run / "release")
    assert 0 < len(samples) < len(originals)
    for sample in samples:
        source = originals[sample["__key__"]]
        assert sample["jpg"] == source["jpg"]
        assert sample["txt"] == source["caption"].encode("utf-8")
        meta = json.loads(sample["json"])
        balance = meta.pop("balance")
        assert meta == source["json"] and balance["weight"] == 1.0 and 0 < balance["q"] <= 1


def test_run_manifest_counts_and_checksums_match_the_files(coco_mini_run):
    release = coco_mini_run / "release"
    manifest = json.loads((release / "manifest.json").read_text())
    assert sorted(p.name for p in release.glob("*.tar")) == [s["name"] for s in manifest["shards"]]
    for shard in manifest["shards"]:
        data = (release / shard["name"]).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (shard["bytes"], shard["sha256"])
        assert shard["samples"] == len(list(webdataset.WebDataset(str(release / shard["name"]))))
    counts = manifest["counts"]
    annotate_counts = json.loads((coco_mini_run / "annotations" / "counts.json").read_text())
    assert counts["samples_read"] == annotate_counts["records_read"] == 159
    assert counts["kept"] + counts["dropped"] + counts["quarantined_total"] == 159
    assert counts["output_samples"] == sum(s["samples"] for s in manifest["shards"])
    solution = BalanceSolution.from_json((coco_mini_run / "solution.json").read_text())
    assert manifest["solution_digest"] == release_module.solution_digest(solution)


def test_run_release_data_bias_respects_the_gap(coco_mini_run, coco_mini_shards, tmp_path):
    """Weights mode: the release's own weighted shares meet the gap exactly; bernoulli: within
    sampling noise of the planned release."""
    solution = BalanceSolution.from_json((coco_mini_run / "solution.json").read_text())
    weighted = tmp_path / "weighted"
    resample.resample(coco_mini_shards.glob, str(coco_mini_run / "annotations"),
                      str(coco_mini_run / "solution.json"), str(weighted), mode="weights",
                      pipeline_args=TWO_WORKERS)
    bias = _release_bias(weighted, solution, min_support=2)
    assert bias.summary()["pairs_measured"] >= 4
    assert bias.association_bias_max <= GAP + 1e-6
    assert bias.representation_bias <= GAP + 1e-6
    stats = json.loads((coco_mini_run / "release" / "stats.json").read_text())
    before = stats["data_bias"]["before"]["summary"]
    # coco_mini captions name men far more often than women
    assert before["representation_bias"] > 0.2
    realized = _release_bias(coco_mini_run / "release", solution, min_support=2).summary()
    reported = stats["data_bias"]["realized"]["summary"]
    assert realized["representation_bias"] == pytest.approx(reported["representation_bias"])
    assert realized["representation_bias"] < before["representation_bias"] / 2


def test_run_writes_report_and_card_next_to_the_release(coco_mini_run):
    release = coco_mini_run / "release"
    page = (release / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 2 and "http" not in page.split("<body>")[1]
    card = (release / "README.md").read_text()
    manifest = json.loads((release / "manifest.json").read_text())
    assert "Perceived" in card and f"seed: {manifest['seed']}" in card
    assert f"kept: {manifest['counts']['kept']}" in card


def test_run_is_reproducible_into_the_same_directory(coco_mini_run, coco_mini_shards):
    before = json.loads((coco_mini_run / "release" / "manifest.json").read_text())
    assert cli.main([
        "run", "--input", coco_mini_shards.glob, "--output", str(coco_mini_run), "--keep-rate",
        "0.7", "--min-support", "2", "--samples-per-shard", "50", "--method", "exact", *TWO_WORKERS
    ]) == 0
    after = json.loads((coco_mini_run / "release" / "manifest.json").read_text())
    assert after == before


def _worst_gap_excess(release_dir, solution):
    """max over the plan's constrained (value, concept) pairs and values of |share - target| - gap,
    with the shares counted from the release's own captions, annotated again here."""
    spec = solution.spec
    rows = []
    for sample in _release_samples(release_dir):
        attributes, concepts, _ = annotate_caption(sample["txt"].decode("utf-8"))
        rows.append((set(attributes), set(concepts)))
    worst = -1.0
    for value, concept, gap in zip(spec.unit_values, spec.unit_concepts, spec.unit_gaps):
        name = spec.attribute_names[value]
        among = [a for a, c in rows if a and (concept < 0 or spec.concept_names[concept] in c)]
        if among:
            share = sum(name in a for a in among) / len(among)
            worst = max(worst, abs(share - spec.targets[value]) - gap)
    return worst


@pytest.mark.slow
def test_coco_val_captions_released_within_the_gap_by_exact_counts(shared_data, tmp_path):
    """The default exact mode: the release's own shares meet the requested gap, at 99.5% of the
    largest feasible keep rate; the Bernoulli draw of the same plan does not."""
    output = tmp_path / "coco_val"
    gap = 0.05
    assert cli.main([
        "run", "--input", str(shared_data / "coco_val2017_captions.json"), "--output", str(output),
        "--keep-rate", "max", "--association-gap", str(gap), "--representation-gap", str(gap),
        "--samples-per-shard", "5000", *TWO_WORKERS
    ]) == 0
    release = output / "release"
    manifest = json.loads((release / "manifest.json").read_text())
    assert manifest["counts"]["samples_read"] == 25014 and manifest["mode"] == "exact"
    first = _release_samples(release)[0]
    assert sorted(k for k in first if not k.startswith("__")) == ["json", "txt"]
    solution = BalanceSolution.from_json((output / "solution.json").read_text())
    assert sum(u >= 0 for u in solution.spec.unit_concepts) >= 40
    assert _worst_gap_excess(release, solution) <= 1e-12
    kept = manifest["counts"]["kept"]
    assert kept >= 0.995 * solution.statistics["max_keep_rate"] * 25014
    stats = json.loads((release / "stats.json").read_text())
    assert stats["data_bias"]["before"]["summary"]["association_bias_max"] > 0.2
    bernoulli = tmp_path / "bernoulli"
    resample.resample(str(shared_data / "coco_val2017_captions.json"), str(output / "annotations"),
                      str(output / "solution.json"), str(bernoulli), mode="bernoulli",
                      samples_per_shard=5000, pipeline_args=TWO_WORKERS)
    assert _worst_gap_excess(bernoulli, solution) > 0.01


def test_demo_makes_its_data_and_prints_where_the_release_is(tmp_path, capsys):
    assert cli.main(["demo", "--output", str(tmp_path), "--num-samples", "800", *TWO_WORKERS]) == 0
    printed = capsys.readouterr().out
    release = tmp_path / "run" / "release"
    assert f"release:      {release}/" in printed and "report.html" in printed
    lines = {line.split()[0]: line.split()[1:] for line in printed.splitlines()
             if line.startswith(("before ", "planned ", "realized "))}
    assert float(lines["before"][1]) > 0.3 and float(lines["realized"][1]) < float(
        lines["before"][1])
    # The plan itself meets the default 2-point share gap; only the Bernoulli draw adds noise.
    assert float(lines["planned"][1]) <= 0.02 + 1e-3
    assert (release / "README.md").exists() and (release / "manifest.json").exists()


def test_commands_log_what_they_do_and_not_beams_bigquery_warning(tmp_path):
    """Each step says what it did in words; Beam's import-time BigQuery warning (balancebeam never
    uses BigQuery; google-apitools, a dependency, keeps Beam from logging it) does not show."""
    demo = subprocess.run([sys.executable, "-m", "pipeline.cli", "demo", "--output", str(tmp_path),
                           "--num-samples", "300"], capture_output=True, text=True, check=True)
    assert "apitools" not in demo.stderr
    for line in ("INFO pipeline.run_all: 1/4 annotate", "INFO pipeline.balance: solved M4",
                 "INFO pipeline.resample: read 300 records", "INFO pipeline.report: data AB max"):
        assert line in demo.stderr, demo.stderr
    assert "INFO apache_beam" not in demo.stderr  # Beam's own INFO chatter stays out
    assert "kept" in demo.stdout


def test_local_worker_logs_are_quiet_unless_asked_for(coco_mini_shards, tmp_path):
    """Multi-process DirectRunner workers log ~100 INFO lines per job; the job's summary must show.
    """
    from pipeline import options

    def stderr_of(*extra):
        output = tmp_path / f"out{len(extra)}"
        command = [
            sys.executable, "-m", "pipeline.cli", "annotate", "--input", coco_mini_shards.glob,
            "--output", str(output), *TWO_WORKERS, *extra
        ]
        return subprocess.run(command, capture_output=True, text=True, check=True).stderr

    # the runner relays the workers' records
    worker_line = "local_job_service: Worker: severity: INFO"
    assert worker_line not in stderr_of()
    assert worker_line in stderr_of(f"{options.WORKER_LOG_FLAG}=INFO")  # the user's choice stands
    # other runners keep Beam's own default: their workers' logs go to the service's log viewer
    for runner, expected in ((None, "WARNING"), ("DirectRunner", "WARNING"), ("DataflowRunner",
                                                                              None)):
        args = [] if runner is None else [f"--runner={runner}"]
        level = options.pipeline_options(args).get_all_options()["default_sdk_harness_log_level"]
        assert level == expected, runner
