"""Tests of the annotators without Beam: lexicon format, text matching, image decoding, zero-shot.

The zero-shot tests use a tiny randomly initialised open_clip model through the real code path.
"""
import io

import numpy as np
import pytest
from PIL import Image

from pipeline.annotators import combine
from trainer.images import ImageRejected, decode_image
from pipeline.annotators.lexicon import Lexicon, LexiconError, plural_of
from pipeline.annotators.text import TextAnnotator, annotate_caption

MAN, WOMAN = "perceived_gender:man", "perceived_gender:woman"


@pytest.mark.parametrize("caption, attributes", [
    ("A man riding a horse.", [MAN]),
    ("Two MEN and a Woman at a table", [MAN, WOMAN]),
    ("The woman's umbrella is red.", [WOMAN]),          # possessive
    ("The boys' bicycles lean on a fence.", [MAN]),     # plural possessive
    ("A womanly figure in the theme park", []),          # no match inside words
    ("Where the mango trees grow", []),                  # "man" inside "mango", "he" inside "the"
    ("She holds her phone.", [WOMAN]),
    ("A policeman directs traffic.", [MAN]),
    ("", []),
])
def test_perceived_gender_terms_match_whole_words_plurals_and_possessives(caption, attributes):
    assert annotate_caption(caption)[0] == attributes


@pytest.mark.parametrize("caption, concept", [
    ("A police officer stands by a car", "police officer"),     # multi-word term
    ("Police-officers stand by a car", "police officer"),       # hyphen and generated plural
    ("Three buses parked", "bus"),                               # plural with -es
    ("Fresh strawberries in a bowl", "strawberry"),             # plural with -ies
    ("A TELEVISION on the wall", "tv"),                          # synonym, upper case
    ("Knives on a cutting board", "knife"),                      # irregular plural
    ("Two postmen deliver the letters", "mail carrier"),         # compound in -man (inflect)
    ("Businesspeople around a table", "businessperson"),         # compound in -person
    ("A rack of woollen scarves", "scarf"),                      # -f -> -ves
])
def test_concepts_match_synonyms_plurals_and_multi_word_terms(caption, concept):
    assert concept in annotate_caption(caption)[1]


def test_longer_term_wins_over_the_term_inside_it():
    attributes, concepts, evidence = annotate_caption("A hot dog and a teddy bear next to a dog.")
    assert concepts == ["dog", "hot dog", "teddy bear"]  # "dog" from the last word only
    attributes, concepts, _ = annotate_caption("A hot dog on a plate")
    assert "dog" not in concepts and "hot dog" in concepts


def _naive_answer(lexicon, caption):
    """What the lexicon says of one caption, found without the automaton: every term searched for
    as a whole word (str.find) in the caption lowered with every run of non-word characters made
    one space, a hit dropped when another hit spans it, the rest by where they start."""
    import re

    text = " " + re.sub(r"[\W_]+", " ", caption.lower()).strip() + " "
    labels_of = {}
    for label, terms in lexicon.attribute_terms.items():
        for term in terms:
            labels_of.setdefault(term, ([], []))[0].append(label)
    for concept, terms in lexicon.concept_terms.items():
        for term in terms:
            labels_of.setdefault(term, ([], []))[1].append(concept)
    hits = []
    for term in labels_of:
        at = text.find(f" {term} ")
        while at >= 0:
            hits.append((at, at + len(term) + 2, term))
            at = text.find(f" {term} ", at + 1)
    kept = sorted(hit for hit in hits if not any(
        other != hit and other[0] <= hit[0] and hit[1] <= other[1] for other in hits))
    words = {}
    for _, _, term in kept:
        for label in labels_of[term][0]:
            words.setdefault(label, [])
            if term not in words[label]:
                words[label].append(term)
    concepts = sorted({concept for _, _, term in kept for concept in labels_of[term][1]})
    evidence = {}
    if words:
        evidence["text"] = {label: words[label] for label in sorted(words)}
    if concepts:
        evidence["concepts"] = {concept: "text" for concept in concepts}
    return sorted(words), concepts, evidence


def test_batch_labels_equal_a_naive_search_of_every_term(shared_data):
    """label_batch matches a whole batch in one pass and drops inner hits with array operations:
    its answers equal a term-by-term search of each caption on real COCO captions, and on captions
    made to trip a batch: a term split across two captions, a NUL inside a caption, non-ASCII
    captions among ASCII ones, nested terms, a caption with more hits than a row holds, blanks."""
    import json

    document = json.loads((shared_data / "coco_mini" / "captions_val2017.json").read_text())
    coco = [a["caption"] for a in document["annotations"]][:1500]
    tricky = [
        "a man ate a hot", "dog on a skateboard",  # "hot dog" must not join two captions
        "a woman\x00man on a police\x00officer bench", "", "   ", "?!...", "_woman_",
        "Ein Mann und eine Frau", "Σ café nurse", "the WOMAN\u2019S bike", "naïve police officer",
        "A hot dog and a teddy bear next to a dog.", "police officers and a police officer",
        "computer mouse computer mice palm trees", "the the man man woman",
        " ".join(["police officer", "palm tree", "hot dog", "woman", "a tv screen"] * 12),
        "MAN\tWOMAN\nGIRL\rBOY", "ice cream cake", "x" * 3000 + " woman",
    ]
    lexicon = Lexicon.load()
    annotator = TextAnnotator(lexicon)
    for captions in (coco + tricky, tricky, [c for c in tricky if "\x00" not in c], coco[:1],
                     tricky[-4:-3], []):
        codes, answers = annotator.label_batch(captions)
        assert len(codes) == len(captions)
        for caption, code in zip(captions, codes):
            attributes, concepts, evidence, evidence_json = answers[code]
            expected = _naive_answer(lexicon, caption)
            assert (attributes, concepts, evidence) == expected, caption
            assert json.loads(evidence_json) == expected[2]
            assert annotator.labels(caption)[:3] == expected, caption


def test_batch_labels_with_deeply_nested_terms(tmp_path):
    """Terms inside terms inside terms, overlapping ones and repeats (a lexicon of its own): a hit
    spanned by a longer hit several hits away in the batch's order is dropped, as a term-by-term
    search says."""
    import itertools
    import random

    (tmp_path / "people.txt").write_text(
        "@kind attribute\n@group role\nchef: chef, head chef, sous chef\n"
        "cook: cook, line cook, head cook\n")
    (tmp_path / "things.txt").write_text(
        "@kind concept\nbarn: barn, red barn, big red barn, big red barn door\nred: red\n"
        "door: door, barn door, red barn door\nbig: big, big red\nhead: head\n"
        "line: line, sous chef line\n")
    lexicon = Lexicon.load(tmp_path)
    words = ["big", "red", "barn", "door", "head", "chef", "sous", "line", "cook", "the", "a"]
    rng = random.Random(3)
    captions = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 14))) for _ in range(3000)]
    captions += [" ".join(p) for p in itertools.permutations(["big", "red", "barn", "door"])]
    captions += ["big red barn door " * 10]  # more hits than a row holds
    codes, answers = TextAnnotator(lexicon).label_batch(captions)
    for caption, code in zip(captions, codes):
        assert answers[code][:3] == _naive_answer(lexicon, caption), caption


def test_fast_caption_normalisation_equals_the_regular_expression():
    """normalise_caption's byte-table path for ASCII equals lowering and replacing every run of
    non-word characters (\\W and _) by one space, on random text over all of ASCII and some
    non-ASCII letters, digits and spaces."""
    import random
    import re

    from pipeline.annotators.text import normalise_caption

    rng = random.Random(7)
    alphabet = [chr(c) for c in range(128)] + list("ΣσςéÉßİıǅ٣²½\u00a0\u2028\u3000")
    for _ in range(5000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 16)))
        assert normalise_caption(text) == " " + re.sub(r"[\W_]+", " ", text.lower()).strip() + " "


def test_evidence_names_the_words_that_matched():
    _, _, evidence = annotate_caption("Two men and a woman's dog in a kitchen")
    assert evidence == {"text": {MAN: ["men"], WOMAN: ["woman"]},
                        "concepts": {"dog": "text", "kitchen": "text"}}


def test_bundled_vocabulary_covers_the_coco_categories(shared_data):
    import json

    categories = json.loads((shared_data / "coco_mini" / "instances_val2017.json").read_text())
    names = [c["name"] for c in categories["categories"]]
    lexicon = Lexicon.load()
    assert len(names) == 80
    assert set(names) <= set(lexicon.concepts)
    assert len(lexicon.concepts) >= 400
    assert lexicon.groups == {"perceived_gender": ("man", "woman")}


def test_user_lexicon_format(tmp_path):
    (tmp_path / "age.txt").write_text(
        "# ages\n@kind attribute\n@group perceived_age\n@plurals auto\n"
        "child: child, kid,\n  toddler  # continued\nadult: adult, grown-up\n")
    (tmp_path / "things.txt").write_text("@kind concept\n@plurals auto\nbox\nferry: ferry, boat\n")
    annotator = TextAnnotator(Lexicon.load(tmp_path))
    attributes, concepts, _ = annotator(
        "Two grown-ups, three toddlers and children near boxes and ferries")
    assert attributes == ["perceived_age:adult", "perceived_age:child"]
    assert concepts == ["box", "ferry"]
    assert plural_of("police officer") == "police officers"
    assert [plural_of(t) for t in ("postman", "businesswoman", "potato", "sheep")] == [
        "postmen", "businesswomen", "potatoes", "sheep"]


def test_lexicon_without_kind_is_a_clear_error(tmp_path):
    (tmp_path / "bad.txt").write_text("man: man\n")
    with pytest.raises(LexiconError, match="@kind"):
        Lexicon.load(tmp_path / "bad.txt")


def test_text_annotator_pickles_without_its_automaton():
    import pickle

    annotator = TextAnnotator()
    before = annotator("A woman in a kitchen")
    clone = pickle.loads(pickle.dumps(annotator))
    assert clone._automaton is None and clone("A woman in a kitchen") == before


@pytest.mark.parametrize("policy, attributes, concepts", [
    ("union", [MAN, WOMAN], ["dog", "kitchen"]),
    ("text", [MAN], ["kitchen"]),
    ("image", [WOMAN], ["dog"]),
    ("agreement", [], []),
])
def test_combination_policies(policy, attributes, concepts):
    result = combine.combine_annotations([MAN], ["kitchen"], [WOMAN], ["dog"],
                                         combine.parse_policies(policy))
    assert result[:2] == (attributes, concepts)


def test_combination_policy_per_group():
    policies = combine.parse_policies("union", ["perceived_gender=agreement", "concepts=text"])
    attributes, concepts, sources = combine.combine_annotations(
        [MAN, WOMAN], ["kitchen", "dog"], [MAN], ["dog", "cat"], policies)
    assert attributes == [MAN] and concepts == ["dog", "kitchen"]
    assert sources == {"dog": "text+image", "kitchen": "text"}
    with pytest.raises(ValueError):
        combine.parse_policies("union", ["perceived_gender"])


def _encoded(image, image_format, **save_args):
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **save_args)
    return buffer.getvalue()


def test_decode_accepts_real_jpeg_and_png(coco_mini_shards):
    jpeg = coco_mini_shards.records[0]["jpg"]
    image = decode_image(jpeg)
    assert image.mode == "RGB" and max(image.size) == 384  # coco_mini's longer side
    assert decode_image(_encoded(image, "PNG")).size == image.size


def test_decode_rejects_broken_and_oversized_images(coco_mini_shards):
    jpeg = coco_mini_shards.records[0]["jpg"]
    with pytest.raises(ImageRejected) as rejected:
        decode_image(jpeg[: len(jpeg) // 2])  # truncated JPEG
    assert rejected.value.reason == "undecodable_image"
    with pytest.raises(ImageRejected) as rejected:
        decode_image(b"GIF89a" + bytes(100))  # not an allowed format
    assert rejected.value.reason == "undecodable_image"
    with pytest.raises(ImageRejected) as rejected:
        # decompression-bomb limit, checked before decoding
        decode_image(jpeg, max_pixels=100 * 100)
    assert rejected.value.reason == "image_too_large"
    bomb = _encoded(Image.new("1", (12000, 12000)), "PNG")  # 144 Mpx in a few kB
    assert len(bomb) < 100_000
    with pytest.raises(ImageRejected) as rejected:
        decode_image(bomb)
    assert rejected.value.reason == "image_too_large"


@pytest.mark.parametrize("level, rejected", [
    ("full", {"truncated", "not_an_image", "gif", "bomb"}),
    ("draft", {"truncated", "not_an_image", "gif", "bomb"}),
    ("header", {"not_an_image", "gif", "bomb"}),
    ("none", set()),
])
def test_each_validation_level_rejects_what_it_promises(coco_mini_shards, level, rejected):
    """header still refuses non-images, formats outside the allow-list and bombs by declared size;
    only a full or draft decode sees broken pixel data; none looks at nothing."""
    from trainer.images import check_image

    jpeg = coco_mini_shards.records[0]["jpg"]
    cases = {"good_jpeg": jpeg, "good_png": _encoded(Image.new("RGB", (40, 30)), "PNG"),
             "truncated": jpeg[: len(jpeg) // 2], "not_an_image": b"<html>not an image</html>",
             "gif": _encoded(Image.new("RGB", (8, 8)), "GIF"),
             "bomb": _encoded(Image.new("1", (12000, 12000)), "PNG")}
    found = set()
    for name, data in cases.items():
        try:
            check_image(data, level)
        except ImageRejected:
            found.add(name)
    assert found == rejected


@pytest.fixture(scope="module")
def zero_shot(tiny_clip):
    from pipeline.annotators.image import ZeroShotConfig, ZeroShotImageAnnotator

    def make(**overrides):
        config = ZeroShotConfig(tiny_clip.architecture, str(tiny_clip.checkpoint_path),
                                str(tiny_clip.config_path), **overrides)
        lexicon = Lexicon.load()
        return ZeroShotImageAnnotator(config, lexicon.groups, lexicon.concepts)
    return make


def test_zero_shot_loads_the_checkpoint_and_embeds_a_batch(zero_shot, tiny_clip, coco_mini_shards):
    import pickle

    import torch

    from pipeline.annotators.image import ZeroShotConfig, load_model

    images = [record["jpg"] for record in coco_mini_shards.records[:5]]
    annotator = pickle.loads(pickle.dumps(zero_shot()))  # Beam ships it to workers like this
    embeddings = annotator.embed_images(images)
    assert embeddings.shape == (5, 32)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
    # The same checkpoint gives the same model; a fresh random model does not.
    np.testing.assert_allclose(zero_shot().embed_images(images), embeddings, rtol=1e-5)
    torch.manual_seed(1)
    fresh, _, _ = load_model(
        ZeroShotConfig(tiny_clip.architecture, None, str(tiny_clip.config_path)))
    assert not torch.equal(fresh.visual.conv1.weight,
                           annotator._loaded()["model"].visual.conv1.weight)


def test_zero_shot_reads_balancebeam_training_checkpoints(tiny_clip, tmp_path):
    """`balancebeam train` writes {"model", "model_name", "optimizer", ...}: its models annotate
    too."""
    import torch

    from pipeline.annotators.image import ZeroShotConfig, load_model

    reference, _, _ = load_model(
        ZeroShotConfig(tiny_clip.architecture, str(tiny_clip.checkpoint_path),
                       str(tiny_clip.config_path)))
    state = torch.load(tiny_clip.checkpoint_path, weights_only=True)["state_dict"]
    trained = tmp_path / "final.pt"
    torch.save({"model": {f"module.{k}": v for k, v in state.items()},
                "model_name": tiny_clip.architecture, "step": 7, "optimizer": {}}, trained)
    loaded, _, _ = load_model(
        ZeroShotConfig(tiny_clip.architecture, str(trained), str(tiny_clip.config_path)))
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    torch.save({"model": state, "model_name": "some-other-arch"}, trained)
    with pytest.raises(ValueError, match="some-other-arch"):
        load_model(ZeroShotConfig(tiny_clip.architecture, str(trained), str(tiny_clip.config_path)))


def test_zero_shot_knows_balancebeams_bundled_architectures():
    """--image-model bb-tiny-vit works without --image-model-config, in a fresh process (a Beam
    worker)."""
    import subprocess
    import sys

    code = ("from pipeline.annotators.image import ZeroShotConfig, load_model; "
            "model, _, _ = load_model(ZeroShotConfig('bb-tiny-vit')); print(type(model).__name__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "CLIP"


def test_zero_shot_margin_rule_and_concept_top_k(zero_shot, coco_mini_shards):
    images = [record["jpg"] for record in coco_mini_shards.records[:6]]
    everyone = zero_shot(person_margin=-10.0, concept_top_k=2, concept_min_probability=0.0)
    results = everyone.annotate_images(images)
    assert len(results) == 6
    for attributes, concepts, scores in results:
        assert attributes and set(attributes) <= {MAN, WOMAN}
        assert set(scores) == set(attributes) and all(0 < p <= 1 for p in scores.values())
        assert len(concepts) == 2
    nobody = zero_shot(person_margin=10.0, concept_top_k=0).annotate_images(images)
    assert all(attributes == [] and concepts == [] for attributes, concepts, _ in nobody)


def test_zero_shot_on_precomputed_embeddings_matches_images(zero_shot, coco_mini_shards):
    images = [record["jpg"] for record in coco_mini_shards.records[:4]]
    annotator = zero_shot(person_margin=-10.0, concept_top_k=3, concept_min_probability=0.0)
    embeddings = annotator.embed_images(images)
    assert annotator.annotate_embeddings(embeddings * 3.0) == annotator.annotate_images(images)
    with pytest.raises(ValueError, match="shape"):
        annotator.annotate_embeddings(np.ones((2, 7)))


def _reference_scores(state, groups, concepts, config, embeddings, person_visible):
    """The zero-shot rule row by row, written from its definition (docs/annotate.md), to check the
    batched annotator against."""
    def softmax(values):
        values = np.asarray(values, dtype=np.float32)
        exp = np.exp(values - values.max())
        return exp / exp.sum()

    results = []
    for row, vector in enumerate(np.asarray(embeddings, dtype=np.float32)):
        vector = vector / np.linalg.norm(vector)
        no_person = max(float(np.dot(vector, p)) for p in state["no_person"])
        attributes, scores = [], {}
        for group, values in groups.items():
            similarity = state["groups"][group] @ vector
            logits = state["logit_scale"] * np.append(similarity, np.float32(no_person))
            probability = softmax(logits)
            visible = person_visible[row]
            if visible is None:
                visible = similarity.max() - no_person >= config.person_margin
            for index, value in enumerate(values):
                if visible and similarity.max() - similarity[index] <= config.overlap_margin:
                    attributes.append(f"{group}:{value}")
                    scores[f"{group}:{value}"] = round(float(probability[index]), 4)
        probability = softmax(state["logit_scale"] * (state["concepts"] @ vector))
        ranked = sorted(range(len(concepts)), key=lambda i: (-probability[i], i))
        ranked = ranked[:config.concept_top_k]
        results.append(
            (attributes,
             [concepts[i] for i in ranked
              if probability[i] >= config.concept_min_probability], scores))
    return results


@pytest.mark.parametrize("floor", [0.0, 0.1, 0.5])
def test_batched_zero_shot_scores_match_the_row_by_row_rule(tmp_path, floor):
    """Planted near-ties (two values within the overlap margin), stated and unstated person
    visibility, and concept floors that keep none, some or all of the top k."""
    from pipeline.annotators.image import ZeroShotConfig, ZeroShotImageAnnotator

    rng = np.random.default_rng(7)
    dim, concepts = 16, tuple(f"c{i}" for i in range(30))
    groups = {"perceived_gender": ("man", "woman"), "perceived_age": ("young", "old")}
    unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
    arrays = {"logit_scale": np.float32(30.0),
              "no_person": unit(rng.standard_normal((3, dim))).astype(np.float32),
              "group_names": np.array(list(groups)), "concept_names": np.array(concepts),
              "concepts": unit(rng.standard_normal((30, dim))).astype(np.float32)}
    for i, (group, values) in enumerate(groups.items()):
        arrays[f"group_{i}"] = unit(rng.standard_normal((len(values), dim))).astype(np.float32)
        arrays[f"group_{i}_values"] = np.array(values)
    np.savez(tmp_path / "prompts.npz", **arrays)
    embeddings = rng.standard_normal((400, dim)).astype(np.float32)
    embeddings[:40] = arrays["group_0"][0] + arrays["group_0"][1]  # man and woman tie
    # a clear concept
    embeddings[40:80] = 3 * arrays["concepts"][5] + rng.standard_normal((40, dim)) * 0.1
    visible = [None] * 100 + [True] * 100 + [False] * 100 + [None] * 100
    config = ZeroShotConfig(architecture="unused", prompt_embeddings=str(tmp_path / "prompts.npz"),
                            concept_min_probability=floor, person_margin=-0.1)
    annotator = ZeroShotImageAnnotator(config, groups, concepts)
    state = annotator._loaded()
    batched = annotator.annotate_embeddings(embeddings, visible)
    expected = _reference_scores(state, groups, concepts, config, embeddings, visible)
    assert [(a, c, sorted(s)) for a, c, s in batched] == [(a, c, sorted(s)) for a, c, s in expected]
    # float32 sums in another order
    for (_, _, scores), (_, _, reference) in zip(batched, expected):
        assert all(abs(scores[label] - reference[label]) <= 2e-4 for label in scores)
    assert any(len(a) == 2 for a, _, _ in batched[:40]), "the planted tie gives both values"
    assert all(c[0] == "c5" for _, c, _ in batched[40:80]), "the planted concept comes first"
    assert any(len(c) < 3 for _, c, _ in batched) == (floor > 0), (
        "a floor leaves some rows fewer than k"
    )


def test_annotate_caption_returns_copies_that_do_not_change_later_answers():
    """The annotator shares one answer among captions with the same hits; the public entry point
    hands out copies, so a caller editing them cannot change another caption's labels."""
    attributes, concepts, evidence = annotate_caption("A man riding a horse.")
    attributes.append("perceived_gender:woman")
    concepts.clear()
    evidence["text"].clear()
    again = annotate_caption("The man rides a horse!")
    assert again[0] == [MAN] and "horse" in again[1] and again[2]["text"] == {MAN: ["man"]}
