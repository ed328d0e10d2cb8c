"""The study's results: per-arm mean and spread over seeds, paired tests, the table and the plots.

An arm is a data variant (trained on it from scratch) or a fine-tuning schedule; seeds pair runs.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from pipeline.files import atomic_create, write_text_atomically
from trainer.metrics import association_bias_along

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
PLOT_FILE = "progress.png"
# (key in a summarized evaluation, column title); for the first four, nearer 0 is better. "AB along
# data" is metrics.association_bias_along: mean AB_r signed by the original data's direction per
# concept. "RB neutral" is RB on the evaluation images no value is labelled on (empty scenes,
# ambiguous figures): which value the model names when the image does not say; n/a without such
# images.
METRICS = (("rb", "RB"), ("rb_neutral", "RB neutral"), ("ab_mean", "AB mean"), ("ab_max", "AB max"),
           ("ab_aligned", "AB along data"), ("concept_accuracy", "zero-shot acc"),
           ("attribute_accuracy", "attribute acc"), ("image_to_text_recall@5", "I->T R@5"),
           ("text_to_image_recall@5", "T->I R@5"))
BIAS_METRICS = ("rb", "rb_neutral", "ab_mean", "ab_max", "ab_aligned")
# How fast a fine-tuning schedule moves each bias: steps after the switch to half the final change.
RECOVERY_METRICS = (("rb", "RB"), ("ab_mean", "AB mean"))
# kept in results.json
VARIANT_KEYS = ("keep_rate", "rows", "data_bias", "labelled_data_bias", "proxies")
# The paper reports differences as significant at p < 0.05 (paired over seeds).
SIGNIFICANCE_LEVEL = 0.05


def summarize_evaluation(result: dict) -> dict:
    """The numbers the study keeps from one trainer.evaluate result."""
    summary = {"rb": result["representation_bias"]["rb"],
               "rb_neutral": (result.get("representation_bias_neutral") or {}).get("rb"),
               "attribute_accuracy": result.get("attribute_accuracy"),
               "concept_accuracy": result.get("concept_accuracy")}
    association = result.get("association_bias")
    if association:
        summary.update(ab_mean=association["ab_mean_abs"], ab_max=association["ab_max_abs"],
                       ab_per_concept=association["ab_per_concept"])
    for key, value in (result.get("retrieval") or {}).items():
        if "recall@" in key:
            summary[key] = value
    return summary


def _spread(values) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0, "values": []}
    array = np.asarray(values, dtype=float)
    return {"mean": float(array.mean()), "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0,
            "n": len(values), "values": [float(v) for v in values]}


def paired_test(a, b) -> dict:
    """Paired t-test over seeds (scipy.stats.ttest_rel), as the paper compared variants."""
    from scipy import stats

    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    result = {"n": len(pairs), "mean_difference": None, "p_value": None}
    if not pairs:
        return result
    x, y = np.array(pairs, dtype=float).T
    result["mean_difference"] = float((x - y).mean())
    if len(pairs) >= 2 and np.ptp(x - y) > 0:
        result["p_value"] = float(stats.ttest_rel(x, y).pvalue)
    return result


def default_comparisons(arms) -> list:
    """Every arm against the original; balanced against the random control; proxies against
    balanced."""
    pairs = [(arm, "original") for arm in arms if arm != "original"]
    for pair in (("balanced", "random"), ("balanced_proxies", "balanced")):
        if pair[0] in arms and pair[1] in arms:
            pairs.append(pair)
    return pairs


def half_change_steps(curve: dict, switch: int, key: str):
    """(change, steps): a schedule's change of `key` from the switch to its final checkpoint, and
    the steps after the switch until the metric first got half of that change; steps None when the
    change is 0 or the metric is missing. curve: {step: summary}, the first variant's run up to the
    switch, then the fine-tune."""
    after = sorted(step for step in curve if step > switch)
    start = curve.get(switch, {}).get(key)
    if not after or start is None or curve[after[-1]].get(key) is None:
        return None, None
    change = curve[after[-1]][key] - start
    if change == 0:
        return 0.0, None
    for step in after:
        value = curve[step].get(key)
        if value is not None and (value - start) / change >= 0.5:
            return float(change), step - switch
    return float(change), after[-1] - switch


def with_aligned_bias(evaluations: dict, directions: dict) -> dict:
    """{step: summary} with ab_aligned added (None without directions or per-concept AB)."""
    return {
        int(step): {
            **value, "ab_aligned": association_bias_along(
                value.get("ab_per_concept") or {}, directions)
        }
        for step, value in evaluations.items()
    }


def collect(config: dict, variants: dict, runs: dict, directions: dict | None = None) -> dict:
    """results.json's content from the variants' data bias and every run's evaluations.

    directions: the original data's association direction per concept (data_bias.data_directions).
    """
    directions = directions or {}
    steps = int(config["train"]["steps"])
    seeds = list(config["seeds"])
    arms = {
        name: {"kind": "variant", "first": name, "switch_at": None}
        for name in config["variants"]
    }
    for schedule in config["schedules"]:
        arms[schedule.name] = {"kind": "schedule", "first": schedule.first, "then": schedule.then,
                               "switch_at": schedule.switch_at}
    results = {"steps": steps, "seeds": seeds, "arms": {}, "comparisons": [], "variants": {},
               "data_directions": directions}
    for name, variant in variants.items():
        results["variants"][name] = {
            k: variant.get(k)
            for k in VARIANT_KEYS if variant.get(k) is not None
        }
    for name, arm in arms.items():
        finals, curves = [], []
        for seed in seeds:
            run = runs[(name, seed)]
            evaluations = with_aligned_bias(run["evaluations"], directions)
            finals.append(evaluations[max(evaluations)])
            curve = {}
            # the first variant's run up to the switch, then the fine-tune
            if arm["kind"] == "schedule":
                switch = round(arm["switch_at"] * steps)
                first = with_aligned_bias(runs[(arm["first"], seed)]["evaluations"], directions)
                curve.update({s: v for s, v in first.items() if s <= switch})
                curve.update({switch + s: v for s, v in evaluations.items()})
            else:
                curve = evaluations
            curves.append(curve)
        progress = sorted(set.intersection(*[set(c) for c in curves]))
        arm["final"] = {key: _spread([f.get(key) for f in finals]) for key, _ in METRICS}
        if arm["kind"] == "schedule":
            switch = round(arm["switch_at"] * steps)
            arm["recovery"], half_steps = {}, {}
            for key, _ in RECOVERY_METRICS:
                # one per seed
                measured = [half_change_steps(curve, switch, key) for curve in curves]
                half_steps[key] = [m[1] for m in measured]
                arm["recovery"][key] = {"change": _spread([m[0] for m in measured]),
                                        "half_change_steps": _spread(half_steps[key])}
            arm["recovery"]["rb_vs_ab_steps"] = paired_test(half_steps["rb"], half_steps["ab_mean"])
        arm["progress"] = {"fraction": [s / steps for s in progress]}
        for key in BIAS_METRICS + ("concept_accuracy",):
            points = [_spread([c[s].get(key) for c in curves]) for s in progress]
            arm["progress"][key] = [p["mean"] for p in points]
            arm["progress"][key + "_std"] = [p["std"] for p in points]
        results["arms"][name] = arm
    for a, b in default_comparisons(list(arms)):
        def complete(arm, key):  # a paired test needs every seed's value
            final = results["arms"][arm]["final"][key]
            return final["values"] if final["n"] == len(seeds) else []

        tests = {key: paired_test(complete(a, key), complete(b, key)) for key, _ in METRICS}
        results["comparisons"].append({"arm": a, "baseline": b, "tests": tests})
    return results


def _number(value, digits=3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def markdown_table(results: dict) -> str:
    """Final metrics (mean ± spread over seeds), data bias per variant, and the paired tests."""
    seeds = results["seeds"]
    lines = [
        f"Final checkpoints, mean ± standard deviation over {len(seeds)} seeds "
        f"({', '.join(map(str, seeds))}); {results['steps']} steps per arm.", "",
        "| arm | " + " | ".join(title for _, title in METRICS) + " |",
        "|---" * (len(METRICS) + 1) + "|"
    ]
    for name, arm in results["arms"].items():
        cells = [
            f"{_number(arm['final'][k]['mean'])} ± {_number(arm['final'][k]['std'])}"
            for k, _ in METRICS
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Data bias of each variant's training data. \"annotated\": as its release report measures "
        "it, perceived gender x the labels of interest (plus the balanced proxies for "
        "balanced_proxies) on the rows the annotator labelled; \"image labels\": from every "
        "sample's own labels (what the image shows, captioned or not), n/a when the data carries "
        "none:", "",
        "| variant | keep rate | samples kept | proxies balanced | annotated RB | annotated AB max "
        "| annotated AB mean | image-label AB max | image-label AB mean |", "|---" * 9 + "|"
    ]
    for name, variant in results["variants"].items():
        after = (variant.get("data_bias") or {}).get("after") or {}
        labelled = variant.get("labelled_data_bias") or {}
        kept = (variant.get("rows") or {}).get("kept")
        proxies = ", ".join(variant.get("proxies") or []) or "-"
        lines.append(
            f"| {name} | {_number(variant.get('keep_rate'))} | {'all' if kept is None else kept} | "
            f"{proxies} | {_number(after.get('representation_bias'))} | "
            f"{_number(after.get('association_bias_max'))} | "
            f"{_number(after.get('association_bias_mean'))} | "
            f"{_number(labelled.get('association_bias_max'))} | "
            f"{_number(labelled.get('association_bias_mean'))} |")
    schedules = {name: arm for name, arm in results["arms"].items() if arm.get("recovery")}
    if schedules:
        lines += [
            "",
            "Fine-tuning schedules: each bias's change from the switch to the end, and the steps "
            "after the switch until it first had half of that change (mean ± standard deviation "
            "over seeds); the last column pairs RB's steps with AB's by seed (negative: RB moves "
            "first).", "",
            "| schedule | " + " | ".join(f"{title} change | {title} steps to half"
                                         for _, title in RECOVERY_METRICS) + " | RB - AB steps |",
            "|---" * (2 * len(RECOVERY_METRICS) + 2) + "|"
        ]
        for name, arm in schedules.items():
            cells = []
            for key, _ in RECOVERY_METRICS:
                change, half = arm["recovery"][key]["change"], arm["recovery"][key][
                    "half_change_steps"]
                cells += [f"{_number(change['mean'])} ± {_number(change['std'])}",
                          f"{_number(half['mean'], 0)} ± {_number(half['std'], 0)}"]
            test = arm["recovery"]["rb_vs_ab_steps"]
            cells.append(f"{_number(test['mean_difference'], 0)} (p={_number(test['p_value'])})")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Paired t-tests over seeds (scipy.stats.ttest_rel): mean difference (arm - baseline), "
        f"p-value; * marks p < {SIGNIFICANCE_LEVEL}.", "",
        "| arm vs baseline | " + " | ".join(title for _, title in METRICS) + " |",
        "|---" * (len(METRICS) + 1) + "|"
    ]
    for comparison in results["comparisons"]:
        cells = []
        for key, _ in METRICS:
            test = comparison["tests"][key]
            p = test["p_value"]
            star = "*" if p is not None and p < SIGNIFICANCE_LEVEL else ""
            cells.append(f"{_number(test['mean_difference'])} (p={_number(p)}){star}")
        row = f"| {comparison['arm']} vs {comparison['baseline']} | "
        lines.append(row + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_progress(results: dict, path: Path) -> None:
    """RB, AB (mean |AB_r|, and along the data's direction) and zero-shot accuracy against training
    done.

    Top row: the variants. Bottom row (when there are schedules): the schedules, dashed, next to
    the two variants they switch between, so "how fast does fine-tuning fix RB / AB" reads off it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = results["arms"]
    rows = [[name for name, arm in arms.items() if arm["kind"] == "variant"]]
    schedules = [name for name, arm in arms.items() if arm["kind"] == "schedule"]
    if schedules:
        ends = {arms[name][key] for name in schedules for key in ("first", "then")}
        rows.append([name for name in rows[0] if name in ends] + schedules)
    panels = (
        ("rb", "model RB"),
        ("rb_neutral", "model RB on neutral images"),
        ("ab_mean", "model AB (mean |AB_r|)"),
        ("ab_aligned", "model AB along the data's direction"),
        ("concept_accuracy", "zero-shot accuracy"),
    )
    figure, axes = plt.subplots(
        len(rows), len(panels), figsize=(4.5 * len(panels), 4 * len(rows)), squeeze=False
    )
    colours = {name: f"C{i % 10}" for i, name in enumerate(arms)}
    for row, names in zip(axes, rows):
        for axis, (key, title) in zip(row, panels):
            for name in names:
                arm = arms[name]
                fraction = arm["progress"]["fraction"]
                mean = np.array(
                    [np.nan if v is None else v for v in arm["progress"][key]], dtype=float
                )
                spread = np.array(
                    [np.nan if v is None else v for v in arm["progress"][key + "_std"]], dtype=float
                )
                style = "--" if arm["kind"] == "schedule" else "-"
                axis.plot(
                    fraction, mean, style, marker="o", markersize=3, label=name, color=colours[name]
                )
                axis.fill_between(
                    fraction, mean - spread, mean + spread, color=colours[name], alpha=0.12
                )
            axis.set_title(title)
            axis.set_xlabel("fraction of training steps")
            axis.grid(alpha=0.3)
        row[0].legend(fontsize=7)
    figure.suptitle(f"mean ± standard deviation over seeds {results['seeds']}")
    figure.tight_layout()
    with atomic_create(str(path)) as handle:
        figure.savefig(handle, format="png", dpi=100)
    plt.close(figure)


def write_outputs(results: dict, output: Path) -> None:
    for name, text in (
        (RESULTS_JSON, json.dumps(results, indent=2, sort_keys=True) + "\n"),
        (RESULTS_MD, markdown_table(results)),
    ):
        write_text_atomically(str(output / name), text)
    plot_progress(results, output / PLOT_FILE)
