"""`balancebeam evaluate`: a model's representation bias, association bias and quality (zero-shot).

Definitions follow DESIGN.md "Bias of a model"; the arithmetic lives in trainer.metrics.
"""
import argparse
import json
import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import yaml

from trainer import data as shard_data
from trainer import english, metrics, models

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    """What to measure: label keys, label values and the prompts that name them."""

    attribute_key: str = "perceived_gender"
    attribute_values: list = field(default_factory=lambda: ["man", "woman"])
    attribute_template: str = "a photo of a {}."
    attribute_targets: list = None  # pi_k for RB; None = uniform
    concept_key: str = "concept"
    concepts: list = None  # None = every concept label found in the data, sorted
    concept_template: str = "a photo of a {}."
    batch_size: int = 256
    recall_ks: tuple = metrics.RECALL_KS

    @classmethod
    def from_yaml(cls, path, **overrides) -> "EvalConfig":
        values = yaml.safe_load(Path(path).read_text()) or {}
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def fill_prompt(template: str, name: str) -> str:
    """Put a label into a prompt template, with the article English needs before it ('a photo of an
    office.', 'a photo of a uniform.'; trainer.english)."""
    prompt = template.format(name)
    if english.with_article(name).startswith("an "):
        prompt = prompt.replace(f" a {name}", f" an {name}")
        prompt = prompt.replace(f"A {name}",
                                f"An {name}") if prompt.startswith(f"A {name}") else prompt
    return prompt


@torch.no_grad()
def embed_texts(model, tokenizer, texts, device, batch_size=256) -> np.ndarray:
    chunks = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(list(texts[start:start + batch_size])).to(device)
        chunks.append(model.encode_text(tokens, normalize=True).float().cpu())
    return torch.cat(chunks).numpy()


@torch.no_grad()
def embed_images(model, preprocess, dataset, device, batch_size=256) -> np.ndarray:
    chunks = []
    for start in range(0, len(dataset), batch_size):
        images = dataset.images(start, start + batch_size, preprocess).to(device)
        chunks.append(model.encode_image(images, normalize=True).float().cpu())
    return torch.cat(chunks).numpy()


def evaluate_model(model, tokenizer, preprocess, dataset, config: EvalConfig = None,
                   device="cpu") -> dict:
    """Zero-shot RB, AB, accuracies and retrieval recall of `model` on a LabelledSet.

    Metrics whose labels are missing from the data are left out and listed under "skipped".
    """
    config = config or EvalConfig()
    model.eval()
    image_embeddings = embed_images(model, preprocess, dataset, device, config.batch_size)
    result = {"images": len(dataset), "unreadable_samples": len(dataset.skipped), "skipped": {}}
    values = list(config.attribute_values)

    attribute_prompts = [fill_prompt(config.attribute_template, value) for value in values]
    attribute_embeddings = embed_texts(model, tokenizer, attribute_prompts, device)
    predicted_value = metrics.zero_shot_predictions(image_embeddings, attribute_embeddings)
    attribute = np.array([labels.get(config.attribute_key) for labels in dataset.labels],
                         dtype=object)
    has_value = np.isin(attribute, values)
    # RB on the images labelled with a value (a balanced set: any gap is the model's own skew), or
    # on every image when none is labelled; and, apart, on the images whose value is not settled
    # (scenes without people, ambiguous figures): which value the model names when nothing says.
    labelled_set = has_value if has_value.any() else np.ones(len(attribute), dtype=bool)
    result["representation_bias"] = metrics.representation_bias(predicted_value[labelled_set],
                                                                values, config.attribute_targets)
    result["representation_bias"]["image_set"] = "labelled" if has_value.any() else "all"
    result["representation_bias"]["prompts"] = attribute_prompts
    if has_value.any() and not has_value.all():
        result["representation_bias_neutral"] = metrics.representation_bias(
            predicted_value[~has_value], values, config.attribute_targets)
    if has_value.any():
        truth = np.array([values.index(v) for v in attribute[has_value]])
        result["attribute_accuracy"] = metrics.top1_accuracy(predicted_value[has_value], truth)
    else:
        result["skipped"]["attribute_accuracy"] = (
            f"no image is labelled with {config.attribute_key} in {values}")

    concept_labels = [labels.get(config.concept_key) for labels in dataset.labels]
    concepts = list(config.concepts or sorted({c for c in concept_labels if isinstance(c, str)}))
    if concepts:
        concept_prompts = [fill_prompt(config.concept_template, concept) for concept in concepts]
        concept_embeddings = embed_texts(model, tokenizer, concept_prompts, device)
        predicted_concept = metrics.zero_shot_predictions(image_embeddings, concept_embeddings)
        # as retrieval, below
        labelled = np.array([c in concepts for c in concept_labels]) & labelled_set
        if labelled.any():
            truth = np.array(
                [concepts.index(c) for c in np.array(concept_labels, dtype=object)[labelled]])
            result["concept_accuracy"] = metrics.top1_accuracy(predicted_concept[labelled], truth)
        if len(values) >= 2 and (attribute == values[0]).any() and (attribute == values[1]).any():
            result["association_bias"] = metrics.association_bias(
                predicted_concept, attribute, concepts, values[0], values[1])
            result["association_bias"]["prompts"] = concept_prompts
        else:
            result["skipped"]["association_bias"] = (
                f"needs images labelled {values[0]!r} and {values[1]!r}")
    else:
        result["skipped"]["association_bias"] = (
            f"no concepts given and no {config.concept_key!r} labels")

    # the labelled images (as RB): the neutral set's empty scenes share one caption per concept
    captioned = [i for i, caption in enumerate(dataset.captions) if caption and labelled_set[i]]
    if len(captioned) >= 2:
        text_embeddings = embed_texts(model, tokenizer, [dataset.captions[i] for i in captioned],
                                      device)
        result["retrieval"] = metrics.retrieval_recall(image_embeddings[captioned], text_embeddings,
                                                       np.arange(len(captioned)), config.recall_ks)
    else:
        result["skipped"]["retrieval"] = "fewer than two captioned images"
    result["config"] = asdict(config)
    return result


def plot_report(result: dict, path) -> None:
    """One PNG: AB per concept, predicted attribute shares vs targets, retrieval recall."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(14, 4))
    association = result.get("association_bias")
    if association:
        names = list(association["ab_per_concept"])
        axes[0].barh(names, [association["ab_per_concept"][n] for n in names], color="tab:purple")
        axes[0].axvline(0, color="black", linewidth=0.8)
        axes[0].set_title(f"AB per concept: P(pred | {association['value_a']}) - P(pred | "
                          f"{association['value_b']})\nmean |AB| {association['ab_mean_abs']:.3f}, "
                          f"max {association['ab_max_abs']:.3f}", fontsize=9)
    representation = result["representation_bias"]
    values = list(representation["predicted_share"])
    positions = np.arange(len(values))
    axes[1].bar(positions - 0.2, [representation["predicted_share"][v] for v in values], 0.4,
                label="predicted")
    axes[1].bar(positions + 0.2, [representation["target_share"][v] for v in values], 0.4,
                label="target")
    axes[1].set_xticks(positions, values)
    axes[1].set_ylim(0, 1)
    axes[1].legend()
    axes[1].set_title(f"zero-shot attribute shares, RB {representation['rb']:.3f}", fontsize=9)
    retrieval = result.get("retrieval")
    if retrieval:
        ks = [key.split("@")[1] for key in retrieval if key.startswith("image_to_text_recall@")]
        positions = np.arange(len(ks))
        axes[2].bar(positions - 0.2, [retrieval[f"image_to_text_recall@{k}"] for k in ks], 0.4,
                    label="image->text")
        axes[2].bar(positions + 0.2, [retrieval[f"text_to_image_recall@{k}"] for k in ks], 0.4,
                    label="text->image")
        axes[2].set_xticks(positions, [f"R@{k}" for k in ks])
        axes[2].set_ylim(0, 1)
        axes[2].legend()
        axes[2].set_title(f"retrieval on {retrieval['images']} captioned images", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="balancebeam evaluate", description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog="examples:\n"
        "  balancebeam evaluate --checkpoint runs/balanced/checkpoints/final.pt --data synth/ "
        "--output eval/\n"
    )
    parser.add_argument("--checkpoint", help="a checkpoint from `balancebeam train`")
    parser.add_argument(
        "--model", help="evaluate an untrained (random) architecture instead: a chance baseline")
    parser.add_argument(
        "--data", required=True,
        help="a synth output dir, shards with labels in json, or folders of images per label")
    parser.add_argument("--output", required=True,
                        help="directory for evaluation.json and evaluation.png")
    parser.add_argument("--config",
                        help="YAML file with EvalConfig fields (prompts, labels, targets)")
    parser.add_argument("--attribute-key")
    parser.add_argument("--attribute-values", help="comma-separated, e.g. man,woman")
    parser.add_argument("--attribute-template", help="prompt template, e.g. 'a photo of a {}.'")
    parser.add_argument("--concept-key")
    parser.add_argument("--concepts", help="comma-separated concept labels (default: all found)")
    parser.add_argument("--concept-template")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--on-bad-sample", choices=sorted(shard_data.HANDLERS), default="warn")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("trainer").setLevel(logging.INFO)
    args = parse_args(argv)
    if bool(args.checkpoint) == bool(args.model):
        raise SystemExit("balancebeam evaluate: give exactly one of --checkpoint or --model")
    split = lambda text: [item.strip() for item in text.split(",")
                          if item.strip()] if text else None  # noqa: E731
    overrides = {
        "attribute_key": args.attribute_key, "attribute_values": split(args.attribute_values),
        "attribute_template": args.attribute_template, "concept_key": args.concept_key,
        "concepts": split(args.concepts), "concept_template": args.concept_template,
        "batch_size": args.batch_size
    }
    if args.config:
        config = EvalConfig.from_yaml(args.config, **overrides)
    else:
        config = EvalConfig(**{k: v for k, v in overrides.items() if v is not None})
    if args.checkpoint:
        model, tokenizer, preprocess, _ = models.load_checkpoint(args.checkpoint,
                                                                 device=args.device)
    else:
        model, tokenizer, _, preprocess = models.create_model(args.model, device=args.device)
    dataset = shard_data.read_labelled(args.data, config.attribute_key, args.on_bad_sample)
    for key, reason in dataset.skipped:
        log.warning("skipped unreadable sample %s: %s", key, reason)
    result = evaluate_model(model, tokenizer, preprocess, dataset, config, device=args.device)
    result["checkpoint"] = args.checkpoint
    result["data"] = args.data
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "evaluation.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_report(result, output / "evaluation.png")
    summary = [f"RB {result['representation_bias']['rb']:.3f}"]
    if "association_bias" in result:
        summary.append(f"AB mean |AB_r| {result['association_bias']['ab_mean_abs']:.3f} "
                       f"(max {result['association_bias']['ab_max_abs']:.3f})")
    if "retrieval" in result:
        summary.append(f"image->text R@1 {result['retrieval']['image_to_text_recall@1']:.3f}")
    print(f"evaluated {len(dataset)} images: " + ", ".join(summary) +
          f"; wrote {output}/evaluation.json")
    return 0
