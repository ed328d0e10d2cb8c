"""data_bias on a seven-row table whose shares, gaps and moments are worked out by hand.

Rows (man, woman | kitchen, ski): see TABLE; rows 6 and 7 show no person.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from solvers.bias import data_bias

#                  man woman kitchen ski
TABLE = np.array([[1, 0, 1, 0],
                  [0, 1, 1, 0],
                  [0, 1, 1, 0],
                  [1, 1, 0, 1],
                  [1, 0, 0, 1],
                  [0, 0, 1, 0],
                  [0, 0, 0, 0]], dtype=float)
ATTRIBUTES, CONCEPTS = TABLE[:, :2], TABLE[:, 2:]
NAMES = dict(attribute_names=["man", "woman"], concept_names=["kitchen", "ski"],
             group_names=["perceived_gender"])


def test_shares_gaps_and_summary_by_hand():
    bias = data_bias(ATTRIBUTES, CONCEPTS, min_support=3, **NAMES)
    # 5 annotated rows; man on rows 1, 4, 5 and woman on rows 2, 3, 4.
    assert bias.value_share == pytest.approx([3 / 5, 3 / 5])
    assert bias.representation_bias == pytest.approx(0.1)
    # kitchen among annotated rows 1-3: man 1/3, woman 2/3. ski among rows 4-5: man 2/2, woman 1/2.
    assert bias.concept_share == pytest.approx(np.array([[1 / 3, 1.0], [2 / 3, 0.5]]))
    assert bias.support == pytest.approx(np.array([[3, 2], [3, 2]]))
    # min_support 3 leaves ski out of data AB.
    assert bias.association_bias_max == pytest.approx(1 / 6)
    assert bias.association_bias_mean == pytest.approx(1 / 6)
    assert bias.worst_association()["concept"] == "kitchen"
    everything = data_bias(ATTRIBUTES, CONCEPTS, min_support=2, **NAMES)
    assert everything.association_bias_max == pytest.approx(0.5)
    # support-weighted: (3/6 + 3/6 + 2 * 0.5 + 2 * 0) / (3 + 3 + 2 + 2)
    assert everything.association_bias_mean == pytest.approx(0.2)
    assert everything.worst_association() == {
        "value": "man", "concept": "ski", "share": 1.0, "target": 0.5, "gap": 0.5, "support": 2.0
    }


def test_moments_by_hand():
    bias = data_bias(ATTRIBUTES, CONCEPTS)
    # R_man = (1/7) sum (s_man - 0.5 a) = (3 - 2.5) / 7; A_man,kitchen = (0.5 - 0.5 - 0.5) / 7.
    assert bias.representation_moment == pytest.approx([0.5 / 7, 0.5 / 7])
    assert bias.association_moment[0, 0] == pytest.approx(-0.5 / 7)
    assert bias.association_moment[1, 0] == pytest.approx(0.5 / 7)
    assert bias.association_moment[0, 1] == pytest.approx(1.0 / 7)  # rows 4, 5: 0.5 + 0.5


def test_keep_probabilities_reweight_the_shares():
    q = np.array([1, 0.5, 0.5, 1, 1, 1, 1])
    bias = data_bias(ATTRIBUTES, CONCEPTS, q=q, min_support=3)
    assert bias.value_share == pytest.approx([3 / 4, 2 / 4])
    assert bias.concept_share[:, 0] == pytest.approx([0.5, 0.5])
    assert bias.association_bias_max == pytest.approx(0.0)
    assert bias.kept_weight == pytest.approx(6.0) and bias.summary()["keep_rate"] == pytest.approx(
        6 / 7)
    # The measured pairs are chosen on the data before q, so before/after compare the same pairs.
    assert bias.kept_support[0, 0] == pytest.approx(2.0) and bias.measured[0, 0]


def test_weights_count_like_repeated_rows():
    weights = np.array([3, 1, 1, 1, 1, 1, 1.0])
    repeated = np.repeat(np.arange(7), weights.astype(int))
    weighted = data_bias(ATTRIBUTES, CONCEPTS, weights=weights, min_support=2)
    copied = data_bias(ATTRIBUTES[repeated], CONCEPTS[repeated], min_support=2)
    assert weighted.concept_share == pytest.approx(copied.concept_share)
    assert weighted.association_moment == pytest.approx(copied.association_moment)
    assert weighted.association_bias_mean == pytest.approx(copied.association_bias_mean)


def test_unconditional_and_preserved_targets():
    unconditional = data_bias(ATTRIBUTES, CONCEPTS, conditional=False, targets=[0.3, 0.3])
    # every row counts: man 3/7; kitchen rows 1, 2, 3, 6: man 1/4, woman 2/4.
    assert unconditional.value_share == pytest.approx([3 / 7, 3 / 7])
    assert unconditional.concept_share[:, 0] == pytest.approx([0.25, 0.5])
    preserved = data_bias(ATTRIBUTES, CONCEPTS, targets="preserve")
    assert preserved.targets == pytest.approx([0.6, 0.6])
    assert preserved.representation_bias == pytest.approx(0.0)


def test_to_dict_is_json_with_none_for_shares_of_nothing():
    # 'tree' only on row 7, which shows no person
    concepts = np.hstack([CONCEPTS, np.eye(7)[:, [6]]])
    bias = data_bias(ATTRIBUTES, concepts, min_support=1, attribute_names=["man", "woman"],
                     concept_names=["kitchen", "ski", "tree"], group_names=["perceived_gender"])
    payload = json.loads(json.dumps(bias.to_dict(), allow_nan=False))
    assert payload["concepts"]["tree"]["shares"] == {"man": None, "woman": None}
    assert payload["concepts"]["tree"]["measured"] == {"man": False, "woman": False}
    assert payload["concepts"]["kitchen"]["support"] == {"perceived_gender": 3.0}
    assert payload["values"]["woman"]["share"] == pytest.approx(0.6)
    assert payload["summary"]["association_bias_max"] == pytest.approx(0.5)


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="keep probabilities"):
        data_bias(ATTRIBUTES, CONCEPTS, q=np.full(7, 1.5))
    with pytest.raises(ValueError, match="partition"):
        data_bias(ATTRIBUTES, CONCEPTS, groups=[[0]])
    with pytest.raises(ValueError, match="only 0 and 1"):
        data_bias(ATTRIBUTES * 3, CONCEPTS)
