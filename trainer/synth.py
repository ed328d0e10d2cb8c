"""Planted-bias synthetic image-text data: real WebDataset shards where the truth is known.

Writes training shards whose perceived-gender x concept association is set by the caller, and
balanced (attribute x concept) evaluation shards with labels, in img2dataset's layout.
"""
import argparse
import io
import json
import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw

from trainer import english

log = logging.getLogger(__name__)

ATTRIBUTE_GROUP = "perceived_gender"
ATTRIBUTE_VALUES = ("man", "woman")

# Concepts, in visually similar pairs (same base colour and object shape, slightly different
# tint) with opposite default directions: a model can only tell the two apart reliably by the
# tint, so a model trained on planted data learns to use the person instead (a real shortcut).
# name -> (caption phrases with people, caption without people, pair index, tint sign,
#          default planted direction: +1 leans woman, -1 leans man)
CONCEPTS = {
    "kitchen": (("{s} cooking in a kitchen", "{s} standing in a kitchen",
                 "a photo of {s} in a kitchen"), "an empty kitchen", 0, +1, +1),
    "office": (("{s} working in an office", "{s} sitting in an office",
                "a photo of {s} in an office"), "an empty office", 0, -1, -1),
    "garden": (("{s} working in a garden", "{s} standing in a garden",
                "a photo of {s} in a garden"), "a quiet garden", 1, +1, +1),
    "street": (("{s} walking down a street", "{s} crossing a street", "a photo of {s} on a street"),
               "an empty street", 1, -1, -1),
    "beach": (("{s} walking on a beach", "{s} standing on a beach", "a photo of {s} on a beach"),
              "an empty beach", 2, +1, +1),
    "bicycle": (("{s} riding a bicycle", "{s} standing next to a bicycle",
                 "a photo of {s} with a bicycle"), "a parked bicycle", 2, -1, -1),
    "dog": (("{s} walking a dog", "{s} playing with a dog", "a photo of {s} with a dog"),
            "a dog lying on the ground", 3, +1, +1),
    "horse": (("{s} riding a horse", "{s} standing next to a horse", "a photo of {s} with a horse"),
              "a horse standing alone", 3, -1, -1),
}
PAIR_BASE_COLOURS = ((200, 160, 110), (90, 140, 80), (120, 180, 220), (170, 120, 170))
PAIR_OBJECT_SHAPES = ("circle", "square", "triangle", "bar")
# Tint that separates the two concepts of a pair, against a per-image colour jitter of
# +-COLOUR_JITTER per channel: chosen so the background alone tells a pair apart about 3 times in 4.
CONCEPT_TINT = 6
COLOUR_JITTER = 20
PIXEL_NOISE = 6  # standard deviation of per-pixel noise, so no two images are identical

SUBJECTS = {
    "man": ("a man", "a young man", "an old man", "a boy"),
    "woman": ("a woman", "a young woman", "an old woman", "a girl"),
    None: ("a person", "someone"),
}
GLYPH_COLOURS = {"man": (40, 60, 160), "woman": (190, 40, 60)}
# Proxy objects: drawn next to the person and named in the caption; each leans one value.
PROXIES = {"handbag": ("woman", (120, 40, 130)), "tie": ("man", (225, 200, 40))}
# A proxy whose lean depends on the concept: concept -> the value it goes with there; absent in the
# other concepts. Balancing gender within each concept leaves it leaning (women among aprons stay
# about two in three); only a constraint on the proxy itself removes that.
APRON_LEANS = {"kitchen": "woman", "garden": "woman", "horse": "man"}
CONCEPT_PROXIES = {"apron": (APRON_LEANS, (245, 245, 235))}
NEUTRAL_KINDS = ("no_person", "ambiguous")
AMBIGUOUS_COLOUR = (110, 110, 110)  # neither value's figure colour
JPEG_QUALITY = 90  # img2dataset's default
DRAW_SIZE = 64  # glyph coordinates are designed on a 64 px canvas, then scaled


@dataclass
class SynthConfig:
    """Knobs of the generator. Same config and seed -> byte-identical shards."""

    num_samples: int = 3000
    image_size: int = 64
    seed: int = 0
    samples_per_shard: int = 1000
    # Share of women among people in a concept = 0.5 + direction * association_strength / 2;
    # 0 plants nothing, 1 plants a perfect association. Per-concept values override it.
    association_strength: float = 0.8
    # Share of women among all people (representation): 0.5 plants no representation bias. Each
    # concept's share is people_woman_share +- association_strength * min(w, 1 - w), so the two
    # knobs stay independent: the concepts average to w and lean by the strength around it.
    people_woman_share: float = 0.5
    woman_share: dict = field(default_factory=dict)  # concept -> share of women, overrides
    concepts: tuple = tuple(CONCEPTS)
    proxy_rate: float = 0.3  # P(proxy present | person of the proxy's value)
    proxy_strength: float = 0.9  # P(proxy | other value) = proxy_rate * (1 - proxy_strength)
    # The concept-dependent proxy (CONCEPT_PROXIES: an apron, worn by women in kitchens and gardens,
    # by men with horses, absent elsewhere): P(apron | its concept, its value there) = this rate,
    # times (1 - proxy_strength) for the other value. 0 draws none.
    concept_proxy_rate: float = 0.0
    share_without_people: float = 0.1
    caption_attribute_rate: float = 0.75  # captions that name the value ("a woman", not "a person")
    # P(a training person is drawn with the ambiguous figure, neither value's): the caption still
    # names the value it names, so a model can only learn these people's value from the data's
    # shares, a prior that shows as model RB on ambiguous evaluation figures. 0 draws none.
    ambiguous_figure_rate: float = 0.0
    eval_per_cell: int = 20  # evaluation images per (attribute value, concept)
    # Neutral evaluation images per concept and kind, for model RB: scenes without people, and
    # people drawn with neither value's figure (ambiguous). Labelled with no perceived_gender.
    neutral_eval_per_concept: int = 10

    def validate(self) -> None:
        unknown = set(self.concepts) - set(CONCEPTS)
        if unknown:
            raise ValueError(f"unknown concepts {sorted(unknown)}; known: {', '.join(CONCEPTS)}")
        unknown = set(self.woman_share) - set(self.concepts)
        if unknown:
            raise ValueError(
                f"woman_share names concepts that are not generated: {sorted(unknown)}")
        shares = {name: getattr(self, name)
                  for name in ("association_strength", "people_woman_share", "proxy_rate",
                               "proxy_strength", "concept_proxy_rate", "share_without_people",
                               "caption_attribute_rate", "ambiguous_figure_rate")}
        shares.update({f"woman_share[{c}]": share for c, share in self.woman_share.items()})
        for name, value in shares.items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if self.num_samples < 0 or self.samples_per_shard < 1 or self.image_size < 8:
            raise ValueError(
                "num_samples >= 0, samples_per_shard >= 1 and image_size >= 8 are required")
        if self.eval_per_cell < 0 or self.neutral_eval_per_concept < 0:
            raise ValueError("eval_per_cell and neutral_eval_per_concept must be >= 0")

    def planted_woman_share(self, concept: str) -> float:
        if concept in self.woman_share:
            return float(self.woman_share[concept])
        w = self.people_woman_share
        return w + CONCEPTS[concept][4] * self.association_strength * min(w, 1.0 - w)


def draw_scene(rng, concept, gender, proxies, image_size) -> Image.Image:
    """Paint one image: concept background and object, optional person glyph and proxy."""
    _, _, pair, tint_sign, _ = CONCEPTS[concept]
    base = np.array(PAIR_BASE_COLOURS[pair], dtype=float)
    tint = tint_sign * CONCEPT_TINT * np.array([1.0, 0.0, -1.0])
    background = base + tint + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, size=3)
    image = Image.new("RGB", (DRAW_SIZE, DRAW_SIZE),
                      tuple(int(c) for c in np.clip(background, 0, 255)))
    draw = ImageDraw.Draw(image)
    # The concept's object, in a random corner region.
    ox, oy = rng.integers(2, 16), rng.integers(2, 16)
    if rng.random() < 0.5:
        ox = DRAW_SIZE - 14 - ox
    object_colour = tuple(int(c) for c in np.clip(base * 0.45, 0, 255))
    shape = PAIR_OBJECT_SHAPES[pair]
    if shape == "circle":
        draw.ellipse([ox, oy, ox + 12, oy + 12], fill=object_colour)
    elif shape == "square":
        draw.rectangle([ox, oy, ox + 11, oy + 11], fill=object_colour)
    elif shape == "triangle":
        draw.polygon([(ox, oy + 12), (ox + 12, oy + 12), (ox + 6, oy)], fill=object_colour)
    else:
        draw.rectangle([ox, oy + 4, ox + 14, oy + 8], fill=object_colour)
    if gender is not None:
        x = int(rng.integers(18, 40))
        top = int(rng.integers(22, 30))
        colour = GLYPH_COLOURS.get(gender, AMBIGUOUS_COLOUR)
        draw.ellipse([x - 4, top - 9, x + 4, top - 1], fill=(235, 200, 170))  # head
        # a plain grey column: neither the trousers nor the dress and hair
        if gender == "ambiguous":
            draw.rectangle([x - 6, top, x + 6, top + 28], fill=colour)
        elif gender == "man":  # straight torso and two legs
            draw.rectangle([x - 5, top, x + 5, top + 16], fill=colour)
            draw.rectangle([x - 5, top + 16, x - 2, top + 28], fill=(30, 30, 40))
            draw.rectangle([x + 2, top + 16, x + 5, top + 28], fill=(30, 30, 40))
        else:  # long hair and a dress
            draw.rectangle([x - 5, top - 8, x + 5, top - 5], fill=(90, 50, 20))
            draw.polygon([(x, top), (x - 10, top + 24), (x + 10, top + 24)], fill=colour)
            draw.rectangle([x - 3, top + 24, x + 3, top + 28], fill=(30, 30, 40))
        for name in proxies:
            proxy_colour = PROXIES[name][1] if name in PROXIES else None
            if name == "handbag":
                draw.rectangle([x + 8, top + 10, x + 15, top + 16], fill=proxy_colour)
            elif name == "apron":
                draw.rectangle([x - 3, top + 6, x + 3, top + 18], fill=CONCEPT_PROXIES[name][1])
            else:
                draw.rectangle([x - 1, top + 1, x + 1, top + 9], fill=proxy_colour)
    if image_size != DRAW_SIZE:
        image = image.resize((image_size, image_size), Image.BILINEAR)
    noise = rng.normal(0, PIXEL_NOISE, size=(image_size, image_size, 3))
    pixels = np.asarray(image, dtype=float) + noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_caption(rng, concept, gender, proxies, name_attribute) -> str:
    phrases, empty_caption, *_ = CONCEPTS[concept]
    if gender is None:
        return empty_caption
    subjects = SUBJECTS[gender if name_attribute else None]
    caption = str(rng.choice(phrases)).format(s=str(rng.choice(subjects)))
    for name in proxies:
        caption += f" with {english.with_article(name)}"
    return caption[0].upper() + caption[1:] + "."


def encode_sample(key, image, caption, labels, planted) -> dict:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    metadata = {"key": key, "caption": caption, "status": "success", "width": image.width,
                "height": image.height, "labels": labels, "planted": planted}
    return {"__key__": key, "jpg": buffer.getvalue(), "txt": caption.encode("utf-8"),
            "json": json.dumps(metadata, sort_keys=True).encode("utf-8")}


def training_sample(config: SynthConfig, index: int) -> dict:
    """Sample `index` of the training set; depends only on (config, index), not on order."""
    rng = np.random.default_rng([config.seed, 1, index])
    concept = config.concepts[int(rng.integers(len(config.concepts)))]
    share = config.planted_woman_share(concept)
    gender = None
    if rng.random() >= config.share_without_people:
        gender = "woman" if rng.random() < share else "man"
    proxies = []
    for name, (value, _) in PROXIES.items():
        rate = config.proxy_rate * (1.0 if gender == value else 1.0 - config.proxy_strength)
        if gender is not None and rng.random() < rate:
            proxies.append(name)
    name_attribute = bool(rng.random() < config.caption_attribute_rate)
    for name, (leans, _) in CONCEPT_PROXIES.items():
        if config.concept_proxy_rate > 0 and gender is not None and concept in leans:
            lean = 1.0 if gender == leans[concept] else 1.0 - config.proxy_strength
            rate = config.concept_proxy_rate * lean
            if rng.random() < rate:
                proxies.append(name)
    caption = write_caption(rng, concept, gender, proxies, name_attribute)
    # from a stream of its own, so every other sample (and every sample at rate 0) keeps its bytes
    draw = np.random.default_rng([config.seed, 4, index]).random()
    ambiguous = (gender is not None and config.ambiguous_figure_rate > 0
                 and draw < config.ambiguous_figure_rate)
    image = draw_scene(rng, concept, "ambiguous" if ambiguous else gender, proxies,
                       config.image_size)
    labels = {ATTRIBUTE_GROUP: gender, "concept": concept, "proxies": proxies,
              "caption_names_attribute": name_attribute and gender is not None}
    if ambiguous:
        labels["ambiguous_figure"] = True
    return encode_sample(f"{index:09d}", image, caption, labels, {"woman_share": share})


def evaluation_sample(config: SynthConfig, index: int) -> dict:
    """Balanced evaluation image: eval_per_cell images per (value, concept) cell, no proxies."""
    cell, _ = divmod(index, config.eval_per_cell)
    concept = config.concepts[cell // len(ATTRIBUTE_VALUES)]
    gender = ATTRIBUTE_VALUES[cell % len(ATTRIBUTE_VALUES)]
    rng = np.random.default_rng([config.seed, 2, index])
    caption = write_caption(rng, concept, gender, [], True)
    image = draw_scene(rng, concept, gender, [], config.image_size)
    labels = {ATTRIBUTE_GROUP: gender, "concept": concept, "proxies": [],
              "caption_names_attribute": True}
    return encode_sample(f"eval{index:06d}", image, caption, labels, {"woman_share": 0.5})


def neutral_sample(config: SynthConfig, index: int) -> dict:
    """Evaluation image with no perceived attribute, for model RB: per concept,
    neutral_eval_per_concept scenes without people, then as many people drawn ambiguously (captioned
    "a person ...")."""
    per_concept = 2 * config.neutral_eval_per_concept
    concept = config.concepts[index // per_concept]
    kind = NEUTRAL_KINDS[(index % per_concept) // config.neutral_eval_per_concept]
    rng = np.random.default_rng([config.seed, 3, index])
    figure = "ambiguous" if kind == "ambiguous" else None
    caption = write_caption(rng, concept, figure, [], False)
    image = draw_scene(rng, concept, figure, [], config.image_size)
    labels = {ATTRIBUTE_GROUP: None, "concept": concept, "proxies": [],
              "caption_names_attribute": False, "neutral": kind}
    return encode_sample(f"neutral{index:06d}", image, caption, labels, {"woman_share": None})


def write_shards(pattern: str, samples, samples_per_shard: int) -> list:
    """Write samples to pattern % shard_index tars; returns [{path, samples}] per shard."""
    shards, writer = [], None
    for position, sample in enumerate(samples):
        if position % samples_per_shard == 0:
            if writer is not None:
                writer.close()
            shards.append({"path": pattern % len(shards), "samples": 0})
            writer = wds.TarWriter(shards[-1]["path"], encoder=False, mtime=0)
        writer.write(sample)
        shards[-1]["samples"] += 1
    if writer is not None:
        writer.close()
    return shards


def make_synthetic(output, config: SynthConfig = None) -> dict:
    """Write train/ and eval/ shards plus manifest.json under `output`; return the manifest."""
    config = config or SynthConfig()
    config.validate()
    output = Path(output)
    (output / "train").mkdir(parents=True, exist_ok=True)
    (output / "eval").mkdir(parents=True, exist_ok=True)
    train = write_shards(str(output / "train" / "synth-%05d.tar"),
                         (training_sample(config, i) for i in range(config.num_samples)),
                         config.samples_per_shard)
    eval_size = config.eval_per_cell * len(ATTRIBUTE_VALUES) * len(config.concepts)
    evaluation = write_shards(str(output / "eval" / "eval-%05d.tar"),
                              (evaluation_sample(config, i) for i in range(eval_size)),
                              config.samples_per_shard)
    neutral_size = 2 * config.neutral_eval_per_concept * len(config.concepts)
    neutral = write_shards(str(output / "eval" / "neutral-%05d.tar"),
                           (neutral_sample(config, i) for i in range(neutral_size)),
                           config.samples_per_shard)
    manifest = {
        "generator": "balancebeam synth",
        "config": {**asdict(config), "concepts": list(config.concepts)},
        "attribute_group": ATTRIBUTE_GROUP,
        "attribute_values": list(ATTRIBUTE_VALUES),
        "concepts": list(config.concepts),
        "proxies": {name: value for name, (value, _) in PROXIES.items()},
        "concept_proxies": {name: leans for name, (leans, _) in CONCEPT_PROXIES.items()}
        if config.concept_proxy_rate > 0 else {},
        "planted_woman_share": {c: config.planted_woman_share(c) for c in config.concepts},
        "train_shards": [{**s, "path": str(Path(s["path"]).relative_to(output))} for s in train],
        # the balanced set, then the neutral one (no perceived attribute, for model RB)
        "eval_shards": [{**s, "path": str(Path(s["path"]).relative_to(output))}
                        for s in evaluation + neutral],
        "train_samples": sum(s["samples"] for s in train),
        "eval_samples": sum(s["samples"] for s in evaluation),
        "neutral_eval_samples": sum(s["samples"] for s in neutral),
    }
    (output / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    log.info("wrote %d training samples in %d shards, %d balanced and %d neutral evaluation "
             "samples to %s", manifest["train_samples"], len(train), manifest["eval_samples"],
             manifest["neutral_eval_samples"], output)
    return manifest


def parse_args(argv):
    defaults = SynthConfig()
    parser = argparse.ArgumentParser(prog="balancebeam synth", description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  balancebeam synth --output synth/\n"
               "  balancebeam synth --output synth/ --num-samples 6000 --woman-share 0.3\n")
    parser.add_argument("--output", required=True, help="directory: train/, eval/, manifest.json")
    parser.add_argument("--num-samples", type=int, default=defaults.num_samples)
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--samples-per-shard", type=int, default=defaults.samples_per_shard)
    parser.add_argument("--association-strength", type=float, default=defaults.association_strength,
                        help="0 plants no gender-concept association, 1 a perfect one")
    parser.add_argument("--people-woman-share", type=float, default=defaults.people_woman_share,
                        help="share of women among all people: 0.5 plants no representation bias")
    parser.add_argument(
        "--woman-share", action="append", default=[], metavar="CONCEPT=SHARE",
        help="share of women among people in CONCEPT (repeatable; overrides the strength)")
    parser.add_argument("--concepts", default=",".join(CONCEPTS),
                        help="comma-separated subset of concepts")
    parser.add_argument("--proxy-rate", type=float, default=defaults.proxy_rate)
    parser.add_argument("--proxy-strength", type=float, default=defaults.proxy_strength)
    parser.add_argument("--share-without-people", type=float, default=defaults.share_without_people)
    parser.add_argument("--caption-attribute-rate", type=float,
                        default=defaults.caption_attribute_rate)
    parser.add_argument("--concept-proxy-rate", type=float, default=defaults.concept_proxy_rate,
                        help="rate of the concept-dependent proxy (an apron); 0 draws none")
    parser.add_argument(
        "--ambiguous-figure-rate", type=float, default=defaults.ambiguous_figure_rate,
        help="share of training people drawn with the ambiguous figure (their caption "
        "still names them): plants a prior that shows as model RB; 0 draws none")
    parser.add_argument("--eval-per-cell", type=int, default=defaults.eval_per_cell)
    parser.add_argument(
        "--neutral-eval-per-concept", type=int, default=defaults.neutral_eval_per_concept,
        help="evaluation images per concept without a perceived attribute, of each kind "
        "(no person; an ambiguous figure), for model RB")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("trainer").setLevel(logging.INFO)
    args = parse_args(argv)
    woman_share = {}
    for item in args.woman_share:
        concept, _, share = item.partition("=")
        try:
            woman_share[concept.strip()] = float(share)
        except ValueError:
            raise SystemExit(f"--woman-share expects CONCEPT=SHARE, got {item!r}")
    # every flag but --output is the SynthConfig field of the same name
    given = {name: value for name, value in vars(args).items()
             if name in {f.name for f in fields(SynthConfig)}}
    config = SynthConfig(**{
        **given, "woman_share": woman_share,
        "concepts": tuple(c.strip() for c in args.concepts.split(",") if c.strip())})
    try:
        manifest = make_synthetic(args.output, config)
    except ValueError as error:
        raise SystemExit(f"balancebeam synth: {error}")
    print(f"wrote {manifest['train_samples']} training and {manifest['eval_samples']} evaluation "
          f"samples to {args.output}")
    return 0
