"""The study's configuration: one YAML file read with yaml.safe_load, checked key by key.

Unknown keys are an error (a typo must not silently fall back to a default); see docs/study.md.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from trainer.synth import SynthConfig

SHIPPED_CONFIG = Path(__file__).resolve().parent / "configs" / "study.yaml"

# The four data variants of the paper's study (Alabdulmohsin et al. 2024, Section 5).
ORIGINAL, BALANCED, BALANCED_PROXIES, RANDOM = "original", "balanced", "balanced_proxies", "random"
VARIANTS = (ORIGINAL, BALANCED, BALANCED_PROXIES, RANDOM)
M4_VARIANTS = (BALANCED, BALANCED_PROXIES)

DEFAULTS = {
    "output": "balancebeam-study",
    "seeds": [0, 1, 2],
    "variants": list(VARIANTS),
    "data": {
        # generate planted-bias data (trainer.synth.SynthConfig fields) ...
        "synthetic": {"num_samples": 6000, "image_size": 32, "seed": 0},
        # ... or give shards: train (shard spec), eval (synth dir, shards or label folders),
        # concepts (labels of interest: a list, or a file with one per line)
        "train": None,
        "eval": None,
        "concepts": None,
    },
    "balance": {
        "keep_rate": "max",  # a fraction, or the largest feasible
        "mode": "bernoulli",  # bernoulli | repeat | weights (balancebeam run --mode)
        "min_support": 20,
        "proxies": 2,  # K proxies discovered beyond the labels of interest, for balanced_proxies
        "samples_per_shard": 1000,
        "extra_args": [],  # more `balancebeam run` flags, e.g. [--association-gap, "0.02"]
    },
    "train": {
        "model": "bb-tiny-vit",
        "loss": "clip",
        "steps": 300,
        "warmup_steps": 30,
        "batch_size": 64,
        "lr": 1e-3,
        "threads": 0,
        "checkpoints": 10,  # evaluation points per run: a checkpoint every steps / checkpoints
        "sample_weights": None,  # None: on exactly when balance.mode is weights
    },
    "schedules": [],  # [{first: original, then: balanced, switch_at: 0.1}, ...]
    "evaluation": {
        "attribute_template": "a photo of a {}.", "concept_template": "a photo of a {}."
    },
    "beam_args": ["--direct_running_mode=multi_processing", "--direct_num_workers=2"],
}
SYNTH_KEYS = {f.name for f in fields(SynthConfig)}  # data.synthetic: SynthConfig's own fields
SCHEDULE_KEYS = {"name", "first", "then", "switch_at"}


@dataclass(frozen=True)
class Schedule:
    """Train on `first` for switch_at of the steps, then fine-tune on `then` for the rest."""

    name: str
    first: str
    then: str
    switch_at: float


def _merge(defaults: dict, given: dict, where: str) -> dict:
    if not isinstance(given, dict):
        raise ValueError(f"{where or 'the config'} must be a mapping, got {type(given).__name__}")
    unknown = set(given) - set(defaults)
    if unknown:
        raise ValueError(
            f"{where or 'config'}: unknown keys {sorted(unknown)}; known: {sorted(defaults)}")
    merged = copy.deepcopy(defaults)
    for key, value in given.items():
        # SynthConfig fields, checked in validate(); unset ones keep our defaults
        if key == "synthetic":
            if not isinstance(value, dict):
                raise ValueError(
                    "data.synthetic must be a mapping of trainer.synth.SynthConfig fields")
            merged[key] = {**defaults[key], **value}
        elif isinstance(defaults[key], dict):
            merged[key] = _merge(defaults[key], value or {}, f"{where}.{key}".lstrip("."))
        else:
            merged[key] = value
    return merged


def schedule_name(first: str, then: str, switch_at: float) -> str:
    return f"{first}-to-{then}-at-{round(switch_at * 100)}pct"


def validate(config: dict) -> dict:
    """Check values; fill derived fields (schedule names, switch steps). Returns the config."""
    data = config["data"]
    if data["train"] is None:
        synthetic = data["synthetic"]
        if not isinstance(synthetic, dict):
            raise ValueError("data.synthetic must be a mapping of trainer.synth.SynthConfig fields")
        unknown = set(synthetic) - SYNTH_KEYS
        if unknown:
            raise ValueError(
                f"data.synthetic: unknown keys {sorted(unknown)}; known: {sorted(SYNTH_KEYS)}")
    elif data["eval"] is None or data["concepts"] is None:
        raise ValueError("with data.train given, data.eval and data.concepts are required too")
    seeds = config["seeds"]
    if not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds) \
            or not all(isinstance(s, int) for s in seeds):
        raise ValueError(f"seeds must be a non-empty list of distinct integers, got {seeds!r}")
    unknown = [v for v in config["variants"] if v not in VARIANTS]
    if unknown or ORIGINAL not in config["variants"]:
        raise ValueError(
            f"variants must include {ORIGINAL!r} and be among {list(VARIANTS)}; got "
            f"{config['variants']}"
        )
    if RANDOM in config["variants"] and BALANCED not in config["variants"]:
        raise ValueError(
            "the random control takes the balanced variant's keep rate: add 'balanced' to variants")
    train = config["train"]
    steps, checkpoints = int(train["steps"]), int(train["checkpoints"])
    if steps < 1 or checkpoints < 1 or steps % checkpoints:
        raise ValueError(
            f"train.steps ({steps}) must be a positive multiple of train.checkpoints "
            f"({checkpoints})"
        )
    schedules = []
    for index, item in enumerate(config["schedules"] or []):
        if not isinstance(item, dict) or set(item) - SCHEDULE_KEYS or not {
                "first", "then", "switch_at"
        } <= set(item):
            raise ValueError(
                f"schedules[{index}] needs first, then, switch_at (and optionally name); got "
                f"{item!r}"
            )
        first, then, switch_at = item["first"], item["then"], float(item["switch_at"])
        for name in (first, then):
            if name not in config["variants"]:
                raise ValueError(
                    f"schedules[{index}] names {name!r}, which is not among variants "
                    f"{config['variants']}"
                )
        switch_step = switch_at * steps
        every = steps // checkpoints
        whole = abs(switch_step - round(switch_step)) <= 1e-9
        if not 0 < switch_at < 1 or not whole or round(switch_step) % every:
            raise ValueError(
                f"schedules[{index}]: switch_at {switch_at} must fall on a checkpoint in (0, 1): "
                f"a multiple of {every} steps out of {steps}")
        schedules.append(
            Schedule(
                item.get("name") or schedule_name(first, then, switch_at), first, then, switch_at))
    names = [s.name for s in schedules]
    if len(set(names)) != len(names) or set(names) & set(VARIANTS):
        raise ValueError(f"schedule names must be distinct and differ from variant names: {names}")
    config["schedules"] = schedules
    if config["balance"]["mode"] not in ("bernoulli", "repeat", "weights"):
        raise ValueError(
            f"balance.mode must be bernoulli, repeat or weights, got {config['balance']['mode']!r}")
    return config


def load(path, output: str | None = None) -> dict:
    """Read, merge with the defaults and validate a study config file."""
    text = Path(path).read_text(encoding="utf-8")
    given = yaml.safe_load(text) or {}
    config = _merge(DEFAULTS, given, "")
    if output:
        config["output"] = output
    return validate(config)
