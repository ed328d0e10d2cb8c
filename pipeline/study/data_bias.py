"""The study's measures of a data set's bias: data RB / AB of a subset of annotated rows, of a
release's own labels (what synthetic data knows every image shows), and the direction of each
association the original data teaches (what "AB along data" is measured against).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# what the study keeps of a solvers.data_bias summary
DATA_BIAS_KEYS = ("representation_bias", "association_bias_max", "association_bias_mean")


def subset_data_bias(run_dir: str, kept_keys: set) -> dict:
    """Data RB / AB of a subset of the annotated rows, measured as the balanced release's are.

    Uses the balanced run's annotations and its solution's constraint space (values, labels of
    interest, targets, min support), so the random control's numbers sit next to the others.
    """
    import pyarrow.parquet as parquet

    from pipeline import run_all
    from pipeline.balance import ANNOTATIONS_GLOB
    from pipeline.signatures import encode
    from solvers import data_bias
    from solvers.solution import BalanceSolution

    paths = run_all.layout(run_dir)
    solution = BalanceSolution.from_json(Path(paths["solution"]).read_text(encoding="utf-8"))
    spec = solution.spec
    attributes, concepts = [], []
    for path in sorted(Path(paths["annotations"]).glob(ANNOTATIONS_GLOB)):
        for row in parquet.read_table(path, columns=["key", "attributes", "concepts"]).to_pylist():
            if row["key"] in kept_keys:
                attributes.append(row["attributes"] or [])
                concepts.append(row["concepts"] or [])
    bias = data_bias(encode(attributes, spec.attribute_names), encode(concepts, spec.concept_names),
                     targets=list(spec.targets), groups=spec.groups, conditional=spec.conditional,
                     min_support=float(solution.statistics.get("min_support", 0)),
                     attribute_names=spec.attribute_names, concept_names=spec.concept_names,
                     group_names=spec.group_names).to_dict()["summary"]
    return {key: bias.get(key) for key in DATA_BIAS_KEYS}


def labelled_data_bias(shards: str, eval_config, min_support: float, weighted: bool) -> dict | None:
    """Data RB / AB from each sample's own labels (json `labels`), or None when samples carry none.

    Synthetic data knows what every image shows, including the people whose caption does not name
    them: text annotation cannot see those, so this is the association a model can still learn.
    """
    import webdataset as wds

    from solvers import data_bias
    from trainer.data import expand_shards, labels_from_metadata

    values, concepts = list(eval_config.attribute_values), list(eval_config.concepts)
    attributes, concept_rows, weights = [], [], []
    samples = wds.DataPipeline(wds.SimpleShardList(expand_shards(shards)),
                               wds.tarfile_to_samples(handler=wds.reraise_exception))
    for sample in samples:
        if "json" not in sample:
            return None
        metadata = json.loads(sample["json"])
        labels = labels_from_metadata(metadata)
        if eval_config.attribute_key not in labels or eval_config.concept_key not in labels:
            return None
        attributes.append([labels[eval_config.attribute_key] == value for value in values])
        concept_rows.append([labels[eval_config.concept_key] == concept for concept in concepts])
        weights.append(
            float((metadata.get("balance") or {}).get("weight", 1.0)) if weighted else 1.0)
    if not attributes:
        return None
    bias = data_bias(np.array(attributes, dtype=float), np.array(concept_rows, dtype=float),
                     weights=np.array(weights), min_support=min_support, attribute_names=values,
                     concept_names=concepts,
                     group_names=[eval_config.attribute_key]).to_dict()["summary"]
    return {key: bias.get(key) for key in DATA_BIAS_KEYS}


def data_directions(stats_path: str, value_a: str) -> dict:
    """d_r = sign(share_a|r - share_a) in the original data, per concept measured with enough
    support.

    Read from a balanced release's stats.json ("before"): the direction of each association the
    original data teaches, for metrics.association_bias_along. Against a's overall share, not its
    target: with a representation skew (20% women) every concept lies on the same side of the
    target, and the directions would say nothing about the association.
    """
    before = json.loads(Path(stats_path).read_text(encoding="utf-8"))["data_bias"]["before"]
    key = next((k for k in before["values"] if k.split(":", 1)[-1] == value_a), None)
    if key is None:
        return {}
    overall = before["values"][key]["share"]
    return {
        concept: int(np.sign(entry["shares"][key] - overall))
        for concept, entry in before["concepts"].items()
        if (entry.get("measured") or {}).get(key) and entry["shares"].get(key) is not None
    }
