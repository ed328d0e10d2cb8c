"""The planted-bias generator: real shards that webdataset reads, the planted truth, determinism.

Also the balanced evaluation sets and the command line.
"""
import io
import json
import re
from collections import Counter

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from trainer import synth
from trainer.synth import SynthConfig, make_synthetic

SMALL = dict(num_samples=1200, image_size=32, samples_per_shard=500, eval_per_cell=3)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    output = tmp_path_factory.mktemp("planted")
    return output, make_synthetic(output, SynthConfig(seed=3, association_strength=0.8, **SMALL))


def read_all(paths):
    return list(
        wds.DataPipeline(wds.SimpleShardList([str(p) for p in paths]), wds.tarfile_to_samples()))


def test_shards_are_webdataset_tars_with_jpeg_caption_and_labels(planted):
    output, manifest = planted
    assert [s["samples"] for s in manifest["train_shards"]] == [500, 500, 200]
    samples = read_all(output / s["path"] for s in manifest["train_shards"])
    assert len(samples) == 1200 and len({s["__key__"] for s in samples}) == 1200
    for sample in samples[:50]:
        image = Image.open(io.BytesIO(sample["jpg"]))
        assert image.format == "JPEG" and image.size == (32, 32)
        metadata = json.loads(sample["json"])
        assert metadata["key"] == sample["__key__"]
        assert metadata["caption"] == sample["txt"].decode()
        assert metadata["labels"]["perceived_gender"] in ("man", "woman", None)
        assert metadata["labels"]["concept"] in synth.CONCEPTS


def test_planted_association_and_captions_match_the_labels(planted):
    output, manifest = planted
    samples = [
        json.loads(s["json"])
        for s in read_all(output / s["path"] for s in manifest["train_shards"])
    ]
    people = [s for s in samples if s["labels"]["perceived_gender"]]
    # 10% of images have no people; their captions name nobody.
    assert 0.06 < 1 - len(people) / len(samples) < 0.14
    for s in samples:
        words = set(re.findall(r"[a-z]+", s["caption"].lower()))
        value = s["labels"]["perceived_gender"]
        named = words & {"man", "boy", "woman", "girl"}
        if value is None or not s["labels"]["caption_names_attribute"]:
            assert not named
        else:
            assert named <= ({"man", "boy"} if value == "man" else {"woman", "girl"}) and named
        assert s["labels"]["concept"] in words
        for proxy in s["labels"]["proxies"]:
            assert proxy in words
    # strength 0.8 plants 90% women in woman-leaning concepts and 10% in the others
    by_concept = Counter((s["labels"]["concept"], s["labels"]["perceived_gender"]) for s in people)
    def woman_share(concept):
        return by_concept[concept, "woman"] / (by_concept[concept, "woman"]
                                               + by_concept[concept, "man"])

    kitchen, office = woman_share("kitchen"), woman_share("office")
    assert manifest["planted_woman_share"]["kitchen"] == pytest.approx(0.9)
    assert kitchen > 0.75 and office < 0.25
    handbags = Counter(s["labels"]["perceived_gender"] for s in people
                       if "handbag" in s["labels"]["proxies"])
    assert handbags["woman"] > 3 * handbags["man"]


def test_no_planted_association_at_strength_zero(tmp_path):
    manifest = make_synthetic(tmp_path, SynthConfig(seed=3, association_strength=0.0, **SMALL))
    samples = [
        json.loads(s["json"])
        for s in read_all(tmp_path / s["path"] for s in manifest["train_shards"])
    ]
    leaning_woman = ("kitchen", "garden", "beach", "dog")
    women = [s["labels"]["perceived_gender"] == "woman" for s in samples
             if s["labels"]["concept"] in leaning_woman and s["labels"]["perceived_gender"]]
    assert 0.4 < sum(women) / len(women) < 0.6


def test_evaluation_set_is_balanced_over_attribute_and_concept(planted):
    output, manifest = planted
    samples = [
        json.loads(s["json"]) for s in read_all(output / s["path"] for s in manifest["eval_shards"])
    ]
    labelled = [s for s in samples if s["labels"]["perceived_gender"]]
    cells = Counter((s["labels"]["perceived_gender"], s["labels"]["concept"]) for s in labelled)
    assert len(cells) == 2 * len(synth.CONCEPTS) and set(cells.values()) == {3}
    assert manifest["eval_samples"] == len(labelled)


def test_neutral_evaluation_images_show_nobody_or_an_ambiguous_figure(planted):
    """For model RB: per concept, scenes without people and people drawn as neither value, no value
    named in the caption, labelled with no perceived gender."""
    output, manifest = planted
    samples = read_all(output / s["path"] for s in manifest["eval_shards"])
    neutral = [(s, json.loads(s["json"])) for s in samples if s["__key__"].startswith("neutral")]
    per = SynthConfig().neutral_eval_per_concept
    assert manifest["neutral_eval_samples"] == len(neutral) == 2 * per * len(synth.CONCEPTS)
    kinds = Counter((m["labels"]["neutral"], m["labels"]["concept"]) for _, m in neutral)
    assert set(kinds.values()) == {per} and len(kinds) == 2 * len(synth.CONCEPTS)
    for sample, metadata in neutral:
        assert metadata["labels"]["perceived_gender"] is None
        words = set(re.findall(r"[a-z]+", metadata["caption"].lower()))
        assert not words & {"man", "boy", "woman", "girl"}
        unnamed = "person" in words or "someone" in words
        assert unnamed == (metadata["labels"]["neutral"] == "ambiguous")
    # the ambiguous figure is neither value's: same scene and noise (same rng), different pixels
    scenes = {
        figure: np.asarray(synth.draw_scene(np.random.default_rng(0), "kitchen", figure, [], 64),
                           float)
        for figure in ("man", "woman", "ambiguous", None)
    }
    for value in synth.ATTRIBUTE_VALUES:
        assert np.abs(scenes["ambiguous"] - scenes[value]).mean() > 1.0
    assert np.abs(scenes["ambiguous"] - scenes[None]).mean() > 1.0  # and a figure is there


def test_ambiguous_figures_hide_the_value_for_the_requested_share_of_people_only():
    """The image shows the ambiguous figure for about that share of the people; the caption and the
    label are the ones the person would have had, and a rate of 0 changes no sample's bytes."""
    base = dict(seed=4, image_size=32, people_woman_share=0.3)
    plain, hidden = SynthConfig(**base), SynthConfig(**base, ambiguous_figure_rate=0.4)
    people = ambiguous = 0
    for index in range(600):
        before, after = synth.training_sample(plain, index), synth.training_sample(hidden, index)
        assert before == synth.training_sample(SynthConfig(**base, ambiguous_figure_rate=0.0),
                                               index)
        labels = json.loads(before["json"])["labels"]
        labels_after = json.loads(after["json"])["labels"]
        assert after["txt"] == before["txt"]
        assert {k: v for k, v in labels_after.items() if k != "ambiguous_figure"} == labels
        if labels["perceived_gender"] is None:
            assert "ambiguous_figure" not in labels_after and after["jpg"] == before["jpg"]
            continue
        people += 1
        if labels_after.get("ambiguous_figure"):
            ambiguous += 1
            assert after["jpg"] != before["jpg"]
        else:
            assert after["jpg"] == before["jpg"]
    assert abs(ambiguous / people - 0.4) < 4 * (0.4 * 0.6 / people) ** 0.5
    with pytest.raises(ValueError, match="ambiguous_figure_rate"):
        SynthConfig(ambiguous_figure_rate=1.5).validate()


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    config = dict(SMALL, num_samples=300)
    first = make_synthetic(tmp_path / "a", SynthConfig(seed=5, **config))
    make_synthetic(tmp_path / "b", SynthConfig(seed=5, **config))
    other = make_synthetic(tmp_path / "c", SynthConfig(seed=6, **config))
    path = first["train_shards"][0]["path"]
    assert (tmp_path / "a" / path).read_bytes() == (tmp_path / "b" / path).read_bytes()
    assert (tmp_path / "a" / path).read_bytes() != (tmp_path / "c" / path).read_bytes()
    manifests = [(tmp_path / run / "manifest.json").read_text() for run in ("a", "b")]
    assert manifests[0] == manifests[1]
    assert other["train_samples"] == 300


def test_sample_depends_only_on_seed_and_index():
    config = SynthConfig(seed=2, image_size=32)
    assert synth.training_sample(config, 17) == synth.training_sample(config, 17)
    assert synth.training_sample(config, 17)["jpg"] != synth.training_sample(config, 18)["jpg"]


def test_bad_configuration_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown concepts"):
        make_synthetic(tmp_path, SynthConfig(concepts=("kitchen", "spaceship")))
    with pytest.raises(ValueError, match="association_strength"):
        make_synthetic(tmp_path, SynthConfig(association_strength=1.5))
    with pytest.raises(SystemExit, match="woman_share"):
        synth.main(["--output", str(tmp_path), "--woman-share", "kitchen=2"])


def test_command_line_writes_shards_and_manifest(tmp_path):
    code = synth.main([
        "--output", str(tmp_path), "--num-samples", "40", "--image-size", "16",
        "--samples-per-shard", "25", "--eval-per-cell", "1", "--woman-share", "kitchen=1.0",
        "--concepts", "kitchen,office"
    ])
    assert code == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["train_samples"] == 40 and len(manifest["train_shards"]) == 2
    assert manifest["planted_woman_share"] == pytest.approx({"kitchen": 1.0, "office": 0.1})
    assert manifest["eval_samples"] == 4
    samples = [
        json.loads(s["json"])
        for s in read_all(tmp_path / s["path"] for s in manifest["train_shards"])
    ]
    assert {
        s["labels"]["perceived_gender"] for s in samples if s["labels"]["concept"] == "kitchen"
    } <= {"woman", None}


def _labels(config):
    return [
        json.loads(synth.training_sample(config, i)["json"])["labels"]
        for i in range(config.num_samples)
    ]


def test_planted_representation_skew_sets_the_share_of_women_among_people():
    config = SynthConfig(
        num_samples=3000, image_size=8, seed=4, people_woman_share=0.3, association_strength=0.8
    )
    people = [l for l in _labels(config) if l["perceived_gender"]]
    women = sum(l["perceived_gender"] == "woman" for l in people) / len(people)
    assert abs(women - 0.3) < 0.03  # 2,700 people: the binomial standard error is 0.009
    # the association still leans each concept by the strength around that share: 0.3 +- 0.8 * 0.3
    assert config.planted_woman_share("kitchen") == pytest.approx(0.54)
    assert config.planted_woman_share("office") == pytest.approx(0.06)
    kitchen = [l["perceived_gender"] == "woman" for l in people if l["concept"] == "kitchen"]
    assert abs(sum(kitchen) / len(kitchen) - 0.54) < 0.08


def test_the_concept_dependent_proxy_survives_balancing_within_concepts_unless_it_is_constrained():
    """M4 on (gender x concept) leaves the apron leaning (it goes with women in kitchens and
    gardens, with men at horses); adding the apron as a constrained column balances it too."""
    from solvers import BalanceProblem, solve

    config = SynthConfig(
        num_samples=4000, image_size=8, seed=2, people_woman_share=0.3, concept_proxy_rate=0.4
    )
    people = [l for l in _labels(config) if l["perceived_gender"]]
    apron = np.array([["apron" in l["proxies"]] for l in people], dtype=float)
    leans = synth.CONCEPT_PROXIES["apron"][0]
    assert {l["concept"] for l in people if "apron" in l["proxies"]} <= set(leans)
    attributes = np.array(
        [[l["perceived_gender"] == v for v in synth.ATTRIBUTE_VALUES] for l in people], float
    )
    concepts = np.array([[l["concept"] == c for c in synth.CONCEPTS] for l in people], float)
    woman = attributes[:, 1]

    def women_among_aprons(q):
        return float((q * woman * apron[:, 0]).sum() / (q * apron[:, 0]).sum())

    gap = 0.02
    options = dict(keep_rate="max", representation_gap=gap, association_gap=gap, min_support=20)
    within = solve(BalanceProblem(attributes, concepts, **options), method="exact").q
    constrained = solve(
        BalanceProblem(attributes, np.hstack([concepts, apron]), **options), method="exact"
    ).q
    # the plan does balance gender within every concept
    for r, concept in enumerate(synth.CONCEPTS):
        rows = concepts[:, r] > 0
        assert abs((within * woman)[rows].sum() / within[rows].sum() - 0.5) <= gap + 1e-6
    # about two aprons in three still go with women
    assert women_among_aprons(within) > 0.5 + 5 * gap
    assert abs(women_among_aprons(constrained) - 0.5) <= gap + 1e-6
