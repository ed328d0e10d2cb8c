"""The planted-bias generator: real shards that webdataset reads, the planted truth, determinism.

Also the balanced evaluation sets and the command line.
"""
import io
import json
import re
from collections import Counter

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
    return list(wds.DataPipeline(wds.SimpleShardList([str(p) for p in paths]), wds.tarfile_to_samples()))


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
    samples = [json.loads(s["json"]) for s in read_all(output / s["path"] for s in manifest["train_shards"])]
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
    kitchen = by_concept["kitchen", "woman"] / (by_concept["kitchen", "woman"] + by_concept["kitchen", "man"])
    office = by_concept["office", "woman"] / (by_concept["office", "woman"] + by_concept["office", "man"])
    assert manifest["planted_woman_share"]["kitchen"] == pytest.approx(0.9)
    assert kitchen > 0.75 and office < 0.25
    handbags = Counter(s["labels"]["perceived_gender"] for s in people if "handbag" in s["labels"]["proxies"])
    assert handbags["woman"] > 3 * handbags["man"]


def test_no_planted_association_at_strength_zero(tmp_path):
    manifest = make_synthetic(tmp_path, SynthConfig(seed=3, association_strength=0.0, **SMALL))
    samples = [json.loads(s["json"]) for s in read_all(tmp_path / s["path"] for s in manifest["train_shards"])]
    women = [s["labels"]["perceived_gender"] == "woman" for s in samples
             if s["labels"]["concept"] in ("kitchen", "garden", "beach", "dog") and s["labels"]["perceived_gender"]]
    assert 0.4 < sum(women) / len(women) < 0.6


def test_evaluation_set_is_balanced_over_attribute_and_concept(planted):
    output, manifest = planted
    samples = [json.loads(s["json"]) for s in read_all(output / s["path"] for s in manifest["eval_shards"])]
    cells = Counter((s["labels"]["perceived_gender"], s["labels"]["concept"]) for s in samples)
    assert len(cells) == 2 * len(synth.CONCEPTS) and set(cells.values()) == {3}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    config = dict(SMALL, num_samples=300)
    first = make_synthetic(tmp_path / "a", SynthConfig(seed=5, **config))
    again = make_synthetic(tmp_path / "b", SynthConfig(seed=5, **config))
    other = make_synthetic(tmp_path / "c", SynthConfig(seed=6, **config))
    path = first["train_shards"][0]["path"]
    assert (tmp_path / "a" / path).read_bytes() == (tmp_path / "b" / path).read_bytes()
    assert (tmp_path / "a" / path).read_bytes() != (tmp_path / "c" / path).read_bytes()
    assert (tmp_path / "a" / "manifest.json").read_text() == (tmp_path / "b" / "manifest.json").read_text()
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
    code = synth.main(["--output", str(tmp_path), "--num-samples", "40", "--image-size", "16",
                       "--samples-per-shard", "25", "--eval-per-cell", "1", "--woman-share", "kitchen=1.0",
                       "--concepts", "kitchen,office"])
    assert code == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["train_samples"] == 40 and len(manifest["train_shards"]) == 2
    assert manifest["planted_woman_share"] == pytest.approx({"kitchen": 1.0, "office": 0.1})
    assert manifest["eval_samples"] == 4
    samples = [json.loads(s["json"]) for s in read_all(tmp_path / s["path"] for s in manifest["train_shards"])]
    assert {s["labels"]["perceived_gender"] for s in samples if s["labels"]["concept"] == "kitchen"} <= {"woman", None}
