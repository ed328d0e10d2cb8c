"""`balancebeam study` on a tiny config: every variant and evaluation, the table, resumption, data
AB.

The whole study (synthetic data, two Beam balancing runs, 10 training runs) runs once per session
(~60 s on 2 cores); a second run must train nothing.
"""
import glob
import json
import logging
from pathlib import Path

import pytest
import yaml

from pipeline.study import config as study_config, data_bias
from pipeline.study import results as study_results, runner as study

VARIANTS = ["original", "balanced", "balanced_proxies", "random"]
SEEDS = [0, 1]
STEPS, CHECKPOINTS = 40, 4
SCHEDULE = "original-to-balanced-at-50pct"
TINY = {
    "seeds": SEEDS,
    "variants": VARIANTS,
    "data": {
        "synthetic": {
            "num_samples": 800, "image_size": 32, "seed": 0, "samples_per_shard": 400,
            "eval_per_cell": 8
        }
    },
    "balance": {
        "keep_rate": "max", "mode": "bernoulli", "min_support": 20, "proxies": 2,
        "samples_per_shard": 400
    },
    "train": {
        "steps": STEPS, "warmup_steps": 4, "batch_size": 32, "checkpoints": CHECKPOINTS,
        "threads": 1
    },
    "schedules": [{"first": "original", "then": "balanced", "switch_at": 0.5}],
}
METRIC_KEYS = {
    "rb", "rb_neutral", "ab_mean", "ab_max", "ab_aligned", "concept_accuracy", "attribute_accuracy",
    "image_to_text_recall@5", "text_to_image_recall@5"
}


def write_config(directory: Path, overrides=None) -> Path:
    path = directory / "study.yaml"
    path.write_text(yaml.safe_dump({**TINY, **(overrides or {})}))
    return path


@pytest.fixture(scope="session")
def finished_study(tmp_path_factory):
    directory = tmp_path_factory.mktemp("study")
    output = directory / "out"
    assert study.run(["--config", str(write_config(directory)), "--output", str(output)]) == 0
    return {"dir": directory, "output": output}


@pytest.mark.slow
def test_every_variant_is_produced(finished_study):
    output = finished_study["output"]
    for name in ("balanced", "balanced_proxies", "random"):
        done = json.loads((output / "variants" / name / study.DONE_FILE).read_text())
        shards = glob.glob(done["shards"])
        assert shards, f"{name} has no shards"
    random_done = json.loads((output / "variants" / "random" / study.DONE_FILE).read_text())
    balanced_done = json.loads((output / "variants" / "balanced" / study.DONE_FILE).read_text())
    assert random_done["keep_rate"] == balanced_done["keep_rate"]
    # the keyed-hash draw keeps about keep_rate of the 800 samples (3 binomial standard deviations)
    assert abs(random_done["rows"]["kept"] - 800 * random_done["keep_rate"]) < 3 * (800 * 0.25)**0.5


@pytest.mark.slow
def test_balanced_data_has_lower_association_bias_than_the_original(finished_study):
    release = finished_study["output"] / "variants" / "balanced" / "run" / "release"
    stats = json.loads((release / "stats.json").read_text())
    before = stats["data_bias"]["before"]["summary"]["association_bias_max"]
    after = stats["data_bias"]["realized"]["summary"]["association_bias_max"]
    assert before > 0.3  # association_strength 0.8 plants a 0.4 gap in every concept
    assert after < before / 2
    # the random control, measured the same way, keeps the planted association: it is a control
    results = json.loads((finished_study["output"] / study_results.RESULTS_JSON).read_text())
    data_bias = {name: v["data_bias"]["after"] for name, v in results["variants"].items()}
    assert data_bias["original"]["association_bias_max"] == pytest.approx(before)
    assert data_bias["balanced"]["association_bias_max"] == pytest.approx(after)
    assert data_bias["random"]["association_bias_max"] > 0.3


@pytest.mark.slow
def test_image_labels_show_the_association_that_text_annotation_cannot_see(finished_study):
    """A quarter of the synthetic captions say "a person": those rows stay skewed after balancing.
    """
    results = json.loads((finished_study["output"] / study_results.RESULTS_JSON).read_text())
    labelled = {name: v["labelled_data_bias"] for name, v in results["variants"].items()}
    annotated = {name: v["data_bias"]["after"] for name, v in results["variants"].items()}
    assert labelled["original"]["association_bias_max"] == pytest.approx(0.4, abs=0.1)  # as planted
    assert labelled["random"]["association_bias_max"] > 0.3
    for name in ("balanced", "balanced_proxies"):
        assert labelled[name]["association_bias_mean"] < labelled["original"][
            "association_bias_mean"]
        assert labelled[name]["association_bias_mean"] > annotated[name]["association_bias_mean"]
    table = (finished_study["output"] / study_results.RESULTS_MD).read_text()
    assert "image-label AB max" in table


@pytest.mark.slow
def test_model_association_is_also_measured_along_the_original_datas_direction(finished_study):
    from trainer.synth import CONCEPTS

    results = json.loads((finished_study["output"] / study_results.RESULTS_JSON).read_text())
    # value a is "man": concepts planted to lean woman (+1) get d_r = -1, those leaning man get +1
    assert results["data_directions"] == {name: -spec[4] for name, spec in CONCEPTS.items()}
    for seed_index, seed in enumerate(SEEDS):
        run = finished_study["output"] / "runs" / "original" / f"seed-{seed}"
        done = json.loads((run / study.DONE_FILE).read_text())
        per_concept = done["evaluations"][str(STEPS)]["ab_per_concept"]
        expected = sum(-CONCEPTS[c][4] * value
                       for c, value in per_concept.items()) / len(per_concept)
        assert results["arms"]["original"]["final"]["ab_aligned"]["values"][
            seed_index] == pytest.approx(expected)
    assert "AB along data" in (finished_study["output"] / study_results.RESULTS_MD).read_text()


def labelled_sample(key, gender, concept, weight=None):
    metadata = {"labels": {"perceived_gender": gender, "concept": concept}}
    if weight is not None:
        metadata["balance"] = {"q": 0.5, "weight": weight}
    return {"__key__": key, "txt": b"a caption", "json": json.dumps(metadata).encode()}


def test_labelled_data_bias_against_hand_counts(tmp_path):
    import webdataset as wds

    from trainer.evaluate import EvalConfig

    rows = [("woman", "kitchen", 1.0), ("woman", "kitchen", 1.0), ("woman", "kitchen", 1.0),
            ("man", "kitchen", 3.0), ("man", "office", 1.0), ("woman", "office", 1.0),
            (None, "office", 1.0), ("man", "dog", 1.0)]
    with wds.TarWriter(str(tmp_path / "labelled-00000.tar"), encoder=False) as writer:
        for index, (gender, concept, weight) in enumerate(rows):
            writer.write(labelled_sample(f"{index:04d}", gender, concept, weight))
    config = EvalConfig(concepts=["kitchen", "office"])  # "dog" is not a label of interest
    shards = str(tmp_path / "*.tar")
    # counted: kitchen 3 women of 4 people -> |0.75 - 0.5| = 0.25; office 1 of 2 -> 0; overall 4 of
    # 7
    counted = data_bias.labelled_data_bias(shards, config, min_support=0, weighted=False)
    assert counted["association_bias_max"] == pytest.approx(0.25)
    assert counted["representation_bias"] == pytest.approx(4 / 7 - 0.5)
    # weighted (weights mode): the man in the kitchen counts 3 times -> 3 of 6 -> 0
    weighted = data_bias.labelled_data_bias(shards, config, min_support=0, weighted=True)
    assert weighted["association_bias_max"] == pytest.approx(0.0)
    # office has 2 annotated rows: below a support of 3 it is left out, kitchen (4) stays
    unweighted = data_bias.labelled_data_bias(shards, config, min_support=3, weighted=False)
    assert unweighted["association_bias_max"] == pytest.approx(0.25)
    # data without labels gives no number rather than a wrong one
    with wds.TarWriter(str(tmp_path / "plain.tar"), encoder=False) as writer:
        writer.write({"__key__": "x", "txt": b"a caption", "json": b"{}"})
    assert data_bias.labelled_data_bias(str(tmp_path / "plain.tar"), config, 0, False) is None


@pytest.mark.slow
def test_every_run_and_checkpoint_is_evaluated(finished_study):
    results = json.loads((finished_study["output"] / study_results.RESULTS_JSON).read_text())
    assert set(results["arms"]) == set(VARIANTS + [SCHEDULE])
    for name, arm in results["arms"].items():
        assert set(arm["final"]) == METRIC_KEYS
        for key in METRIC_KEYS:
            assert arm["final"][key]["n"] == len(SEEDS), (name, key)
            assert arm["final"][key]["std"] is not None
        expected = [i / CHECKPOINTS for i in range(1, CHECKPOINTS + 1)]
        assert arm["progress"]["fraction"] == pytest.approx(expected), name
    for name in VARIANTS:
        for seed in SEEDS:
            evals = sorted(
                (finished_study["output"] / "evals" / name / f"seed-{seed}").glob("step-*.json"))
            assert len(evals) == CHECKPOINTS
    # the schedule fine-tunes from the original run's half-way checkpoint, which is kept for it
    done = json.loads(
        (finished_study["output"] / "runs" / SCHEDULE / "seed-0" / study.DONE_FILE).read_text())
    assert done["init_checkpoint"].endswith("runs/original/seed-0/checkpoints/step-0000020.pt")
    assert done["steps"] == STEPS // 2


@pytest.mark.slow
def test_results_table_has_spread_and_paired_tests(finished_study):
    output = finished_study["output"]
    results = json.loads((output / study_results.RESULTS_JSON).read_text())
    pairs = {(c["arm"], c["baseline"]) for c in results["comparisons"]}
    assert {("balanced", "original"), ("balanced", "random"), ("balanced_proxies", "balanced"),
            (SCHEDULE, "original")} <= pairs
    p_values = [t["p_value"] for c in results["comparisons"] for t in c["tests"].values()]
    assert any(p is not None and 0 <= p <= 1 for p in p_values)
    table = (output / study_results.RESULTS_MD).read_text()
    assert "±" in table and "p=" in table and "ttest_rel" in table
    for name in VARIANTS + [SCHEDULE]:
        assert f"| {name} |" in table
    assert (output / study_results.PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_rerun_skips_every_finished_unit(finished_study, caplog):
    output = finished_study["output"]
    markers = sorted(output.glob("**/" + study.DONE_FILE))
    checkpoints = sorted(output.glob("runs/**/*.pt"))
    before = {path: path.stat().st_mtime_ns for path in markers + checkpoints}
    config = study_config.load(finished_study["dir"] / "study.yaml", str(output))
    with (caplog.at_level(logging.INFO, logger="pipeline"),
          caplog.at_level(logging.INFO, logger="trainer")):
        study.run_study(config)
    messages = [record.getMessage() for record in caplog.records]
    assert not [m for m in messages if m.startswith("training ") or m.startswith("variant ")
                ], messages
    assert sum("(done)" in m for m in messages) == 1 + 3 + len(VARIANTS) * len(SEEDS) + len(SEEDS)
    assert {path: path.stat().st_mtime_ns for path in markers + checkpoints} == before

    # a run that stopped after training but before its marker is finished, not retrained
    marker = output / "runs" / "balanced" / "seed-1" / study.DONE_FILE
    recorded = json.loads(marker.read_text())
    marker.unlink()
    caplog.clear()
    with (caplog.at_level(logging.INFO, logger="pipeline"),
          caplog.at_level(logging.INFO, logger="trainer")):
        study.run_study(config)
    messages = [record.getMessage() for record in caplog.records]
    assert "training balanced seed 1 finished before; evaluating its checkpoints" in messages
    assert not [m for m in messages if m.startswith("training ") and "steps" in m], messages
    assert json.loads(marker.read_text())["evaluations"] == recorded["evaluations"]
    assert {path: path.stat().st_mtime_ns
            for path in checkpoints} == {p: before[p]
                                         for p in checkpoints}


def test_config_errors_are_plain(tmp_path):
    with pytest.raises(ValueError, match="unknown keys"):
        study_config.load(write_config(tmp_path, {"train": {"stepz": 3}}))
    with pytest.raises(ValueError, match="must fall on a checkpoint"):
        study_config.load(
            write_config(
                tmp_path,
                {"schedules": [{"first": "original", "then": "balanced", "switch_at": 0.3}]}))
    with pytest.raises(ValueError, match="random control"):
        study_config.load(write_config(tmp_path, {"variants": ["original", "random"]}))
    assert study.run(["--config", str(write_config(tmp_path, {"colour": 1}))]) == 2


def test_shipped_config_is_valid():
    config = study_config.load(study_config.SHIPPED_CONFIG)
    assert config["variants"] == VARIANTS
    assert [(s.first, s.switch_at) for s in config["schedules"]] == [
        ("original", 0.5), ("original", 0.9), ("balanced", 0.5), ("balanced", 0.9)]
    synthetic = config["data"]["synthetic"]
    # it plants every bias the paper studied: representation (learned as model RB through the
    # ambiguous figures), association, both kinds of proxy
    assert synthetic["people_woman_share"] < 0.5 and synthetic["association_strength"] > 0
    assert synthetic["ambiguous_figure_rate"] > 0
    assert synthetic["proxy_rate"] > 0 and synthetic["concept_proxy_rate"] > 0
    assert synthetic["neutral_eval_per_concept"] > 0 and len(config["seeds"]) >= 5
    # the shipped config until 2026-12-01 differs by the skew and the ambiguous figures only, and
    # docs/study.md's ambiguous-figures run is that config plus 30% ambiguous figures
    unambiguous = study_config.load(
        study_config.SHIPPED_CONFIG.with_name("study-unambiguous.yaml"))
    assert {**unambiguous["data"]["synthetic"], "people_woman_share": 0.2,
            "ambiguous_figure_rate": 0.6} == synthetic
    assert unambiguous["train"] == config["train"] and unambiguous["seeds"] == config["seeds"]
    # the README's ten-seed reading comes from docs/study/study-rb-prior.yaml: the same data and
    # training, its first five seeds the shipped ones
    ten_seeds = study_config.load(
        study_config.SHIPPED_CONFIG.parents[3] / "docs" / "study" / "study-rb-prior.yaml")
    assert ten_seeds["data"] == config["data"] and ten_seeds["train"] == config["train"]
    assert ten_seeds["seeds"][:5] == config["seeds"] and len(ten_seeds["seeds"]) == 10
    ambiguous = study_config.load(
        study_config.SHIPPED_CONFIG.with_name("study-ambiguous-figures.yaml"))
    assert ambiguous["data"]["synthetic"] == {**unambiguous["data"]["synthetic"],
                                              "ambiguous_figure_rate": 0.3}
    assert {k: v for k, v in ambiguous.items() if k not in ("data", "output")} == {
        k: v for k, v in unambiguous.items() if k not in ("data", "output")}
    # the README's ablations build on the association-only benchmark: the same data except that
    # every caption names the person
    config = study_config.load(study_config.SHIPPED_CONFIG.with_name("study-association-only.yaml"))
    ablation = study_config.load(
        study_config.SHIPPED_CONFIG.with_name("study-every-caption-names.yaml"))
    assert ablation["data"]["synthetic"] == {
        **config["data"]["synthetic"], "caption_attribute_rate": 1.0
    }
    assert ablation["train"] == config["train"] and ablation["seeds"] == config["seeds"]
    # the second stage annotates images with the association-only study's own original model
    stage = study_config.load(study_config.SHIPPED_CONFIG.with_name("study-image-annotator.yaml"))
    assert stage["data"]["synthetic"] == config["data"]["synthetic"]
    assert stage["train"] == config["train"]
    extra = stage["balance"]["extra_args"]
    checkpoint = extra[extra.index("--image-checkpoint") + 1]
    first_seed = config["seeds"][0]
    run_dir = f"{config['output']}/runs/original/seed-{first_seed}"
    assert checkpoint == f"{run_dir}/checkpoints/{study.FINAL_CHECKPOINT}"
    assert extra[extra.index("--image-model") + 1] == config["train"]["model"]


@pytest.mark.slow
def test_given_shards_and_eval_set_instead_of_synthetic(finished_study, tmp_path):
    """Your own data: shards, an evaluation set and the labels of interest; original only, one seed.
    """
    data = finished_study["output"] / "data"
    concepts = tmp_path / "concepts.txt"
    concepts.write_text("kitchen\noffice\ngarden\nstreet\nbeach\nbicycle\ndog\nhorse\n")
    config_path = tmp_path / "given.yaml"
    config_path.write_text(
        yaml.safe_dump({
            "seeds": [3], "variants": ["original"], "data": {
                "train": str(data / "train" / "*.tar"), "eval": str(data), "concepts": str(concepts)
            }, "train": {
                "steps": 4, "warmup_steps": 1, "batch_size": 16, "checkpoints": 2, "threads": 1
            }
        }))
    output = tmp_path / "out"
    assert study.run(["--config", str(config_path), "--output", str(output)]) == 0
    assert not (output / "data").exists()  # nothing generated
    results = json.loads((output / study_results.RESULTS_JSON).read_text())
    arm = results["arms"]["original"]
    assert arm["progress"]["fraction"] == [0.5, 1.0]
    assert arm["final"]["ab_mean"]["n"] == 1 and arm["final"]["ab_mean"]["std"] == 0.0
    assert results["comparisons"] == []


def test_partial_synthetic_settings_keep_the_other_defaults(tmp_path):
    config = study_config.load(write_config(tmp_path, {"data": {"synthetic": {"num_samples": 10}}}))
    assert config["data"]["synthetic"] == {"num_samples": 10, "image_size": 32, "seed": 0}
    with pytest.raises(ValueError, match="unknown keys"):
        study_config.load(write_config(tmp_path, {"data": {"synthetic": {"num_sample": 10}}}))


def test_half_change_steps_against_hand_counts():
    """Switch at step 100; RB goes 0.30 -> 0.10 (half reached at step 130), AB 0.20 -> 0.10 (half at
    190)."""
    curve = {
        0: {"rb": 0.5, "ab_mean": 0.3}, 100: {"rb": 0.30, "ab_mean": 0.20},
        130: {"rb": 0.19, "ab_mean": 0.19}, 160: {"rb": 0.12, "ab_mean": 0.16},
        190: {"rb": 0.11, "ab_mean": 0.15}, 220: {"rb": 0.10, "ab_mean": 0.10}
    }
    assert study_results.half_change_steps(curve, 100, "rb") == (pytest.approx(-0.2), 30)
    assert study_results.half_change_steps(curve, 100, "ab_mean") == (pytest.approx(-0.1), 90)
    flat = {100: {"rb": 0.2}, 200: {"rb": 0.2}}
    # no change: no step to name
    assert study_results.half_change_steps(flat, 100, "rb") == (0.0, None)
    assert study_results.half_change_steps({100: {"rb": None}, 200: {"rb": 0.1}}, 100, "rb") == (
        None,
        None,
    )


@pytest.mark.slow
def test_schedules_report_how_fast_each_bias_moves(finished_study):
    results = json.loads((finished_study["output"] / study_results.RESULTS_JSON).read_text())
    recovery = results["arms"][SCHEDULE]["recovery"]
    switch = round(0.5 * STEPS)
    for key in ("rb", "ab_mean"):
        steps = recovery[key]["half_change_steps"]["values"]
        assert all(0 < s <= STEPS - switch for s in steps)
    table = (finished_study["output"] / study_results.RESULTS_MD).read_text()
    assert f"| {SCHEDULE} |" in table and "RB steps to half" in table
