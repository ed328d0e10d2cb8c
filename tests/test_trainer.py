"""The trainer on real synthetic shards: it learns, the evaluator sees planted bias, checkpoints
work.

Two tiny CPU models are trained once per module (planted vs unplanted data, same size and seed).
"""
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import webdataset as wds

from trainer import data, evaluate, models
from trainer.synth import SynthConfig, make_synthetic, training_sample
from trainer.train import TrainConfig, main as train_main, train

ROOT = Path(__file__).resolve().parents[1]
# Sizes chosen so that each model trains in ~30 s on 2 busy cores and the planted-vs-unplanted AB
# gap is large: measured 0.25 vs 0.04 (seed 0) and 0.25 vs 0.03 (seed 1).
TRAIN_SAMPLES, TRAIN_STEPS, SEED = 2500, 250, 0
CHANCE_RECALL_AT_10 = 10 / 320  # 320 balanced evaluation images, one caption each


def train_on(output, association_strength, people_woman_share=0.5):
    make_synthetic(
        output,
        SynthConfig(num_samples=TRAIN_SAMPLES, image_size=32, seed=SEED,
                    association_strength=association_strength, samples_per_shard=500,
                    people_woman_share=people_woman_share))
    summary = train(TrainConfig(data=str(output), output=str(output / "run"), steps=TRAIN_STEPS,
                                warmup_steps=TRAIN_STEPS // 10, seed=SEED, threads=1, log_every=25,
                                progress=False))
    model, tokenizer, preprocess, _ = models.load_checkpoint(summary["checkpoint"])
    result = evaluate.evaluate_model(model, tokenizer, preprocess, data.read_labelled(output))
    losses = [
        json.loads(line)["loss"]
        for line in (output / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    return {"summary": summary, "evaluation": result, "losses": losses, "data": output}


@pytest.fixture(scope="module")
def unplanted(tmp_path_factory):
    return train_on(tmp_path_factory.mktemp("unplanted"), association_strength=0.0)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return train_on(tmp_path_factory.mktemp("planted"), association_strength=1.0)


@pytest.fixture(scope="module")
def skewed(tmp_path_factory):
    """Representation bias planted, no association: women are 10% of the people."""
    return train_on(tmp_path_factory.mktemp("skewed"), association_strength=0.0,
                    people_woman_share=0.1)


@pytest.mark.slow
def test_short_cpu_run_lowers_the_loss_and_retrieves_well_above_chance(unplanted):
    assert unplanted["summary"]["steps"] == TRAIN_STEPS
    assert unplanted["losses"][-1] < 0.6 * unplanted["losses"][0]
    retrieval = unplanted["evaluation"]["retrieval"]
    assert retrieval["image_to_text_recall@10"] > 5 * CHANCE_RECALL_AT_10
    assert retrieval["text_to_image_recall@10"] > 5 * CHANCE_RECALL_AT_10
    assert unplanted["evaluation"]["attribute_accuracy"] > 0.9  # the glyphs are easy to tell apart


@pytest.mark.slow
def test_model_trained_on_planted_data_has_larger_association_bias(planted, unplanted):
    planted_ab = planted["evaluation"]["association_bias"]
    unplanted_ab = unplanted["evaluation"]["association_bias"]
    assert planted_ab["ab_mean_abs"] > unplanted_ab["ab_mean_abs"] + 0.1
    # the direction is the planted one: women are predicted "kitchen" more often than men
    # a=man, b=woman
    assert planted_ab["ab_per_concept"]["kitchen"] < 0 < planted_ab["ab_per_concept"]["office"]


@pytest.mark.slow
def test_model_trained_on_skewed_data_has_larger_representation_bias(skewed, unplanted):
    """Same seed and size: the model that saw women as 10% of the people names fewer of the balanced
    evaluation set's people women (measured 0.04 vs 0.00 at seed 0, 0.05 vs 0.01 at seed 1)."""
    skewed_rb, unplanted_rb = (run["evaluation"]["representation_bias"]
                               for run in (skewed, unplanted))
    assert skewed_rb["image_set"] == unplanted_rb["image_set"] == "labelled"
    assert skewed_rb["rb"] > unplanted_rb["rb"] + 0.02
    # the skew's direction: the rarer value is missed
    assert skewed_rb["predicted_share"]["woman"] < 0.5
    assert skewed["evaluation"]["attribute_accuracy"] < unplanted["evaluation"][
        "attribute_accuracy"]


@pytest.mark.slow
def test_checkpoint_loads_with_weights_only_and_resume_continues(unplanted, tmp_path):
    checkpoint = torch.load(unplanted["summary"]["checkpoint"], weights_only=True)
    assert {"model", "optimizer", "scheduler", "step", "model_name"} <= set(checkpoint)
    assert checkpoint["step"] == TRAIN_STEPS
    shards = str(unplanted["data"] / "train" / "synth-00000.tar")
    common = ["--data", shards, "--output", str(tmp_path), "--batch-size", "16", "--threads", "1",
              "--log-every", "1", "--no-progress"]
    assert train_main(common + ["--steps", "4", "--save-every", "2"]) == 0
    assert (tmp_path / "checkpoints" / "step-0000002.pt").exists()
    assert train_main(common + ["--steps", "6", "--resume", "auto"]) == 0
    resumed = torch.load(tmp_path / "checkpoints" / "final.pt", weights_only=True)
    assert resumed["step"] == 6 and resumed["scheduler"]["last_epoch"] == 6
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2, 3, 4, 5, 6]  # the resumed run started at step 5, not from scratch


@pytest.mark.slow
def test_init_checkpoint_starts_from_the_trained_weights(unplanted, tmp_path):
    summary = train(
        TrainConfig(data=str(unplanted["data"] / "train" / "synth-00000.tar"), output=str(tmp_path),
                    init_checkpoint=unplanted["summary"]["checkpoint"], steps=1, lr=1e-12,
                    batch_size=8, threads=1, progress=False))
    before = torch.load(unplanted["summary"]["checkpoint"], weights_only=True)["model"]
    after = torch.load(summary["checkpoint"], weights_only=True)
    assert after["step"] == 1 and after["model_name"] == "bb-tiny-vit"
    for name, tensor in before.items():
        assert torch.allclose(tensor, after["model"][name], atol=1e-6), name


@pytest.mark.slow
def test_loading_a_checkpoint_does_not_claim_random_weights(unplanted, caplog):
    caplog.set_level("WARNING")
    models.load_checkpoint(unplanted["summary"]["checkpoint"])
    assert not [r for r in caplog.records if models.RANDOM_INIT_WARNING in r.getMessage()]
    # the filter is scoped to model creation: the same message from elsewhere still gets through
    logging.warning("%s 'x'", models.RANDOM_INIT_WARNING)
    assert [r for r in caplog.records if models.RANDOM_INIT_WARNING in r.getMessage()]


def write_shard(path, samples):
    with wds.TarWriter(str(path), encoder=False) as writer:
        for sample in samples:
            writer.write(sample)


def test_loader_reads_balance_weights_and_applies_the_bad_sample_policy(tmp_path):
    config = SynthConfig(image_size=32, seed=1)
    samples = [training_sample(config, i) for i in range(10)]
    for i, sample in enumerate(samples):
        metadata = json.loads(sample["json"])
        metadata["balance"] = {"q": 0.5, "weight": float(i)}
        sample["json"] = json.dumps(metadata).encode()
    samples[3]["jpg"] = b"not a jpeg"
    write_shard(tmp_path / "weighted.tar", samples)
    model, tokenizer, preprocess, _ = models.create_model("bb-tiny-vit")

    def read(policy):
        pipeline = data.training_pipeline([str(tmp_path / "weighted.tar")], preprocess, tokenizer,
                                          1, shuffle_buffer=0, on_bad_sample=policy)
        return [batch for batch in data.training_loader(pipeline, workers=0)]

    batches = read("warn")
    assert sorted(int(weights.item()) for _, _, weights in batches) == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    images, tokens, _ = batches[0]
    assert images.shape == (1, 3, 32, 32) and tokens.shape == (1, 24)
    with pytest.raises(Exception, match="cannot identify image"):
        read("raise")


def test_weighted_training_runs(tmp_path):
    config = SynthConfig(image_size=32, seed=2)
    samples = [training_sample(config, i) for i in range(32)]
    for i, sample in enumerate(samples):
        metadata = json.loads(sample["json"])
        metadata["balance"] = {"q": 0.8, "weight": 1.25 if i % 2 else 0.5}
        sample["json"] = json.dumps(metadata).encode()
    write_shard(tmp_path / "release-00000.tar", samples)
    summary = train(
        TrainConfig(data=str(tmp_path / "release-*.tar"), output=str(tmp_path / "run"), steps=3,
                    batch_size=16, sample_weights=True, loss="siglip", model="bb-tiny-sigmoid",
                    threads=1, progress=False))
    assert summary["steps"] == 3


OPEN_CLIP_LOADER = textwrap.dedent("""
    import argparse, sys
    import webdataset
    from open_clip_train.data import get_wds_dataset
    from trainer import models
    model, tokenizer, preprocess, _ = models.create_model("bb-tiny-vit")
    args = argparse.Namespace(train_data=sys.argv[1], val_data=None, dataset_resampled=False,
        train_num_samples=int(sys.argv[2]), train_data_upsampling_factors=None, seed=0,
        batch_size=50, workers=1, world_size=1)
    info = get_wds_dataset(args, preprocess, is_train=True, tokenizer=tokenizer)
    seen = 0
    for images, texts in info.dataloader:
        seen += images.shape[0]
    print(webdataset.__file__, seen, images.shape[1:], texts.shape[1:])
""")


@pytest.mark.slow
def test_open_clips_own_loader_reads_our_shards(unplanted, tmp_path):
    """open_clip_train 3.x pins webdataset<=0.2.86 (its [training] extra); webdataset 1.x yields an
    end-of-shard marker its grouper does not expect. So run open_clip's loader with the version it
    supports, installed from PyPI into a private folder."""
    pytest.importorskip("pandas", reason="open_clip_train.data imports pandas")
    target = tmp_path / "webdataset-0.2.86"
    install = subprocess.run([
        sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
        "webdataset==0.2.86"
    ], capture_output=True, text=True)
    if install.returncode != 0:
        pytest.skip(
            f"could not install webdataset 0.2.86 for open_clip_train: {install.stderr[-300:]}")
    shards = str(unplanted["data"] / "train" / "synth-{00000..00004}.tar")
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), str(ROOT)]))
    run = subprocess.run([sys.executable, "-c", OPEN_CLIP_LOADER, shards, str(TRAIN_SAMPLES)],
                         capture_output=True, text=True, env=environment, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert str(target) in run.stdout
    assert f" {TRAIN_SAMPLES} torch.Size([3, 32, 32]) torch.Size([24])" in run.stdout
