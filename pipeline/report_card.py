"""The dataset card: the release's README.md, in Markdown, from stats.json and the manifest."""
from __future__ import annotations

import json
import platform
import re

from pipeline.report_stats import (PERCEIVED, coverage_rows, coverage_warnings, headline, number,
                                   release_summary)
from solvers.solution import BalanceSolution

# Names from the data, made safe for Markdown
# -------------------------------------------------------

_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+!|<>~-])")


def markdown_text(text: str) -> str:
    """Text for Markdown prose and tables: every character Markdown or HTML would read, escaped."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))


def code(text: str) -> str:
    """Inline Markdown code that holds any text: the fence is longer than any run of backticks
    inside."""
    text = " ".join(str(text).split())
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    return f"{fence} {text} {fence}"


# Dataset card
# --------------------------------------------------------------------------------------

def _versions() -> dict:
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for package in ("balancebeam", "apache-beam", "numpy", "cvxpy", "webdataset"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            unknown = "not installed (run from source)" if package == "balancebeam" else "unknown"
            versions[package] = unknown
    return versions


def _reading_it(manifest: dict) -> list[str]:
    if manifest.get("format") == "subset":
        return [
            "subset.npy is DataComp's subset file (sorted uids as two uint64 each); hand it to "
            "DataComp's resharder (`--subset-file subset.npy`). keep.parquet, a folder of Parquet "
            "part files read as one table, has one row per annotated record: key, q (keep "
            "probability), copies (0 = dropped), weight.",
            "", "```python", "import numpy as np", "import pyarrow.parquet as pq",
            "uids = np.load(\"subset.npy\", mmap_mode=\"r\")",
            "keep = pq.read_table(\"keep.parquet\").to_pandas()", "```", "",
            "Integrity: manifest.json lists subset.npy and every keep.parquet part with its size "
            "and sha256.",
            ""
        ]
    shards = manifest["shards"]
    pattern = (
        f"{manifest['prefix']}-{{{shards[0]['name'][-9:-4]}..{shards[-1]['name'][-9:-4]}}}.tar"
        if shards else "(no shards)")
    return [
        "```python", "import webdataset as wds",
        f"dataset = wds.WebDataset(\"{pattern}\").decode(\"pil\")", "```", "",
        "sizes.json beside the shards gives each shard's sample count (open_clip reads it).", "",
        "Integrity: manifest.json lists every shard with its size and sha256.", ""
    ]


def dataset_card(stats: dict, manifest: dict, solution: BalanceSolution) -> str:
    head = headline(stats)
    config = solution.statistics.get("config", {})
    members = (
        "" if manifest.get("format") == "subset"
        else " Every sample keeps all its members byte for byte; its json gains "
             "`balance: {q, weight}` (q: keep probability; weight: training weight, q/eta in "
             "weights mode, else 1).")
    lines = [
        "# Balanced image-text release (balancebeam)",
        "",
        f"{release_summary(manifest)}.{members}",
        "",
        "## What \"perceived\" means",
        "",
        PERCEIVED,
        "",
        "## How it was made",
        "",
        "1. annotate: perceived attributes and concepts of every caption (and image, if "
        "configured).",
        "2. balance: Multi-Modal Moment Matching (M4, Alabdulmohsin et al., ICLR 2024) chose keep "
        "probabilities closest to uniform subsampling under share-gap constraints.",
        "3. resample: keyed-hash sampling (blake2b of seed and key), so the kept set is the same "
        "on any runner.",
        "",
        f"- keep rate: {solution.keep_rate:.4f} (asked: "
        f"{solution.statistics.get('keep_rate_requested')})",
        f"- targets: {code(json.dumps(stats['targets'], ensure_ascii=False))}",
        f"- gaps: {code(json.dumps(stats['gaps']))}; minimum support {stats['min_support']:g}",
        f"- solver: {solution.certificate()}",
        f"- mode: {manifest['mode']}, seed: {manifest['seed']}, samples per shard: "
        f"{manifest['samples_per_shard']}",
        "- solution digest (sha256 of the duals and configuration that decide q): "
        f"{manifest['solution_digest']}",
        f"- configuration: {code(json.dumps(config, sort_keys=True, ensure_ascii=False))}",
        f"- versions: {json.dumps(_versions())}",
        "",
        "## Counts",
        "",
        f"- records read: {stats['rows']['samples_read']}; kept: {stats['rows']['kept']}; dropped: "
        f"{stats['rows']['dropped']}; quarantined: {code(json.dumps(stats['quarantine']))}",
        f"- proxies: {', '.join(markdown_text(p['concept']) for p in stats['proxies']) or 'none'}",
        "- concepts left out for low support: "
        f"{code(json.dumps(stats['excluded_low_support'], ensure_ascii=False))}",
        "- concepts left unconstrained on purpose (--unconstrained-concepts): " +
        (", ".join(markdown_text(c["concept"]) for c in stats["unconstrained_concepts"]) or "none"),
        *[
            f"- dropped by the plan: {markdown_text(entry['reason'])}"
            for entry in stats["dropped_concepts"]
        ],
        "",
        "## Data bias (before -> after, counted in this release)",
        "",
        "| | RB | AB max | AB mean |",
        "|---|---|---|---|",
    ]
    for stage, values in head.items():
        lines.append(f"| {stage} | {number(values['representation_bias'])} | "
                     f"{number(values['association_bias_max'])} | "
                     f"{number(values['association_bias_mean'])} |")
    lines += [
        "", "## Annotation coverage", "",
        "Share of rows with an annotated value of each group. Balancing constrains these rows "
        "only; every other row is kept at one common rate.", "",
        "| group | before | planned | released |", "|---|---|---|---|"
    ]
    lines += [
        f"| {markdown_text(group)} | " + " | ".join(cells) + " |"
        for group, cells in coverage_rows(stats)
    ]
    lines += [f"\n**Note:** {warning}." for warning in coverage_warnings(stats, name=markdown_text)]
    lines += ["", "## Reading it", "", *_reading_it(manifest)]
    return "\n".join(lines)
