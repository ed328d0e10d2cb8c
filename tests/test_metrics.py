"""Model bias and quality metrics against values worked out by hand on tiny fixed inputs.

Also pins the weighted losses to open_clip's own losses and to a hand-computed cross-entropy.
"""
import math

import numpy as np
import pytest
import torch
from open_clip.loss import ClipLoss, SigLipLoss

from trainer import metrics
from trainer.losses import WeightedClipLoss, WeightedSigLipLoss


def test_zero_shot_prediction_picks_the_most_similar_prompt():
    images = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, 0.6]])
    prompts = np.array([[1.0, 0.0], [0.0, 1.0]])
    # scores: [1, 0], [0, 1], [0.6, 0.8], [0.8, 0.6]
    assert metrics.zero_shot_predictions(images, prompts).tolist() == [0, 1, 1, 0]


def test_representation_bias_is_the_largest_gap_to_the_target_share():
    predicted = [0, 0, 0, 1]  # 3 of 4 images predicted "man"
    uniform = metrics.representation_bias(predicted, ["man", "woman"])
    assert uniform["rb"] == pytest.approx(0.25)  # |0.75 - 0.5|
    assert uniform["predicted_share"] == {"man": 0.75, "woman": 0.25}
    skewed_target = metrics.representation_bias(predicted, ["man", "woman"], targets=[0.6, 0.4])
    assert skewed_target["rb"] == pytest.approx(0.15)  # |0.75 - 0.6| = |0.25 - 0.4|


def test_association_bias_compares_concept_rates_between_the_two_values():
    concepts = ["kitchen", "office", "beach"]
    predicted = [0, 0, 1, 2, 0, 1, 1, 2, 0]
    attribute = ["woman"] * 4 + ["man"] * 4 + [None]  # the unlabelled last image is ignored
    result = metrics.association_bias(predicted, attribute, concepts, "woman", "man")
    # P(pred | woman) = [2/4, 1/4, 1/4], P(pred | man) = [1/4, 2/4, 1/4]
    assert result["ab_per_concept"] == pytest.approx(
        {"kitchen": 0.25, "office": -0.25, "beach": 0.0})
    assert result["ab_mean_abs"] == pytest.approx(1 / 6)
    assert result["ab_max_abs"] == pytest.approx(0.25)
    assert result["ab_max_concept"] == "kitchen"
    assert result["images"] == {"woman": 4, "man": 4}


def test_association_bias_needs_both_values():
    with pytest.raises(ValueError, match="man"):
        metrics.association_bias([0, 1], ["woman", "woman"], ["a", "b"], "woman", "man")


def test_association_bias_along_the_data_direction_separates_stereotype_from_noise():
    # value a = woman; the data puts women in kitchens (+1) and men in offices (-1)
    directions = {"kitchen": 1, "office": -1, "beach": 0}
    stereotyped = {"kitchen": 0.25, "office": -0.25, "beach": 0.1}
    # beach has no direction
    assert metrics.association_bias_along(stereotyped, directions) == pytest.approx(0.25)
    reversed_ = {"kitchen": -0.1, "office": 0.3, "beach": 0.0}
    assert metrics.association_bias_along(reversed_, directions) == pytest.approx(-0.2)
    # as large as the stereotyped model by mean |AB_r|, but pointing both ways: 0 along the data
    mixed = {"kitchen": 0.25, "office": 0.25, "beach": 0.0}
    assert metrics.association_bias_along(mixed, directions) == pytest.approx(0.0)
    assert metrics.association_bias_along(mixed, {"beach": 0}) is None


def test_top1_accuracy():
    assert metrics.top1_accuracy([0, 1, 1, 2], [0, 1, 2, 2]) == pytest.approx(0.75)


def test_retrieval_recall_by_hand():
    images = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    texts = np.array([[0.8, 0.6], [0.6, 0.8], [1.0, 0.0]])
    # similarity (rows images, columns texts):
    #   image 0: [0.80, 0.60, 1.00]  its caption 0 is beaten by caption 2 -> rank 1
    #   image 1: [0.60, 0.80, 0.00]  caption 1 is best                  -> rank 0
    #   image 2: [0.96, 1.00, 0.60]  caption 2 is beaten twice          -> rank 2
    # text->image, per column: caption 0 (0.8) < 0.96, caption 1 (0.8) < 1.0, caption 2 (0.6) < 1.0
    result = metrics.retrieval_recall(images, texts, [0, 1, 2], ks=(1, 2, 3))
    assert result["image_to_text_recall@1"] == pytest.approx(1 / 3)
    assert result["image_to_text_recall@2"] == pytest.approx(2 / 3)
    assert result["image_to_text_recall@3"] == pytest.approx(1.0)
    assert result["text_to_image_recall@1"] == pytest.approx(0.0)
    assert result["text_to_image_recall@2"] == pytest.approx(1.0)


def test_retrieval_with_two_captions_per_image_counts_the_best_one():
    images = np.array([[1.0, 0.0], [0.0, 1.0]])
    texts = np.array([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])  # captions 0, 1 describe image 0
    result = metrics.retrieval_recall(images, texts, [0, 0, 1], ks=(1,))
    # image 0: best correct caption 1 scores 1.0 -> found; image 1: caption 2 (0.8) < caption 0
    # (1.0)
    assert result["image_to_text_recall@1"] == pytest.approx(0.5)
    # caption 0 -> image 1 scores higher (1 vs 0): miss; caption 1 -> image 0: hit; caption 2: 0.8 >
    # 0.6 hit
    assert result["text_to_image_recall@1"] == pytest.approx(2 / 3)


def _features():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    return image, text


def test_weighted_clip_loss_with_equal_weights_is_open_clips_loss():
    torch.manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    scale = torch.tensor(7.0)
    expected = ClipLoss()(image, text, scale)
    assert WeightedClipLoss()(image, text, scale, weights=torch.ones(6)).item() == pytest.approx(
        expected.item()
    )
    tripled = WeightedClipLoss()(image, text, scale, weights=torch.full((6,), 3.0))
    assert tripled.item() == pytest.approx(expected.item())


def test_weighted_clip_loss_by_hand():
    image, text = _features()
    # logits per image: [[0.6, 0.0], [0.8, 1.0]]; per text: [[0.6, 0.8], [0.0, 1.0]]
    image_0 = math.log(math.exp(0.6) + math.exp(0.0)) - 0.6
    text_0 = math.log(math.exp(0.6) + math.exp(0.8)) - 0.6
    loss = WeightedClipLoss()(image, text, torch.tensor(1.0), weights=torch.tensor([1.0, 0.0]))
    assert loss.item() == pytest.approx((image_0 + text_0) / 2, rel=1e-6)


def test_weighted_siglip_loss_with_equal_weights_is_open_clips_loss():
    torch.manual_seed(1)
    image = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    scale, bias = torch.tensor(10.0), torch.tensor(-5.0)
    expected = SigLipLoss()(image, text, scale, bias)
    got = WeightedSigLipLoss()(image, text, scale, weights=torch.ones(5), logit_bias=bias)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_weighted_siglip_loss_by_hand():
    image, text = _features()
    # logits [[0.6, 0.0], [0.8, 1.0]] - 1; image 0 row: positive pair (0, 0), negative pair (0, 1)
    row_0 = -math.log(1 / (1 + math.exp(-(0.6 - 1)))) - math.log(1 / (1 + math.exp(0.0 - 1)))
    loss = WeightedSigLipLoss()(
        image,
        text,
        torch.tensor(1.0),
        weights=torch.tensor([2.0, 0.0]),
        logit_bias=torch.tensor(-1.0),
    )
    assert loss.item() == pytest.approx(row_0, rel=1e-6)
