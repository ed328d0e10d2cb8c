"""The evaluator's inputs (synth sets, labelled shards, image folders), config and outputs.

An untrained model is enough here: these tests pin down plumbing; test_trainer checks the numbers.
"""
import json

import pytest

from trainer import data, evaluate, models
from trainer.evaluate import EvalConfig
from trainer.synth import SynthConfig, make_synthetic


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    output = tmp_path_factory.mktemp("synth")
    make_synthetic(output, SynthConfig(num_samples=20, image_size=32, eval_per_cell=2, seed=4,
                                       neutral_eval_per_concept=1))
    return output


@pytest.fixture(scope="module")
def random_model():
    model, tokenizer, _, preprocess = models.create_model("bb-tiny-vit")
    return model, tokenizer, preprocess


def test_command_line_writes_json_and_png(synthetic, tmp_path):
    code = evaluate.main(
        ["--model", "bb-tiny-vit", "--data", str(synthetic), "--output", str(tmp_path)])
    assert code == 0
    result = json.loads((tmp_path / "evaluation.json").read_text())
    # 2 values x 8 concepts x 2, and 2 neutral kinds x 8 concepts
    assert result["images"] == 32 + 16
    assert result["association_bias"]["images"] == {"man": 16, "woman": 16}
    # RB on the labelled (balanced) images; apart, on the 16 whose value nothing settles
    assert (
        result["representation_bias"]["images"] == 32
        and result["representation_bias"]["image_set"] == "labelled"
    )
    neutral = result["representation_bias_neutral"]
    assert neutral["images"] == 16 and sum(neutral["predicted_share"].values()) == pytest.approx(
        1.0
    )
    # the labelled images: the empty scenes share captions
    assert result["retrieval"]["images"] == 32
    assert "an office" in " ".join(result["association_bias"]["prompts"])
    assert set(result["retrieval"]) >= {"image_to_text_recall@1", "text_to_image_recall@10"}
    assert (tmp_path / "evaluation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_labelled_shards_and_image_folders_give_the_same_labels(synthetic, tmp_path, random_model):
    shards = data.read_labelled(str(synthetic / "eval" / "eval-*.tar"))  # the balanced set only
    for key, image, caption, labels in zip(
        shards.keys, shards.image_bytes, shards.captions, shards.labels
    ):
        folder = tmp_path / labels["perceived_gender"]
        folder.mkdir(exist_ok=True)
        (folder / f"{key}.jpg").write_bytes(image)
        (folder / f"{key}.txt").write_text(caption)
    (tmp_path / "woman" / "broken.jpg").write_bytes(b"not an image")
    folders = data.read_labelled(tmp_path)
    assert len(folders) == len(shards) == 32
    assert [s for s, _ in folders.skipped] == [str(tmp_path / "woman" / "broken.jpg")]
    assert sorted(l["perceived_gender"] for l in folders.labels) == sorted(
        l["perceived_gender"] for l in shards.labels
    )
    result = evaluate.evaluate_model(*random_model, folders)
    assert "association_bias" in result["skipped"]  # folders carry no concept labels
    assert result["representation_bias"]["images"] == 32 and "retrieval" in result


def test_yaml_config_sets_prompts_and_rejects_unknown_keys(synthetic, tmp_path, random_model):
    good = tmp_path / "good.yaml"
    good.write_text(
        "attribute_template: 'an image of a {}'\nconcepts: [kitchen, office]\n"
        "attribute_targets: [0.3, 0.7]\n"
    )
    config = EvalConfig.from_yaml(good)
    result = evaluate.evaluate_model(*random_model, data.read_labelled(synthetic), config)
    assert result["representation_bias"]["prompts"] == ["an image of a man", "an image of a woman"]
    assert result["representation_bias"]["target_share"] == {"man": 0.3, "woman": 0.7}
    assert list(result["association_bias"]["ab_per_concept"]) == ["kitchen", "office"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("concept_prompts: [x]\n")
    with pytest.raises(ValueError, match="unknown keys"):
        EvalConfig.from_yaml(bad)


def test_exactly_one_model_source_is_required(synthetic, tmp_path):
    with pytest.raises(SystemExit, match="exactly one"):
        evaluate.main(["--data", str(synthetic), "--output", str(tmp_path)])


def test_prompt_articles():
    assert evaluate.fill_prompt("a photo of a {}.", "office") == "a photo of an office."
    assert evaluate.fill_prompt("a photo of a {}.", "kitchen") == "a photo of a kitchen."
    # the article is the one the sound needs, not the first letter
    assert evaluate.fill_prompt("a photo of a {}.", "uniform") == "a photo of a uniform."
    assert evaluate.fill_prompt("A {} at work.", "hour glass") == "An hour glass at work."
