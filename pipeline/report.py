"""The report: what balancing changed, as statistics JSON, a self-contained HTML page and a dataset card.

Reads the counted signatures (before), the solution (planned) and the release's kept signatures
and manifest (what was actually written); no Beam pipeline is needed, the inputs are small.
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import json
import logging
import platform
import re
import sys

import numpy as np
from apache_beam.io.filesystems import FileSystems

from pipeline.balance import SIGNATURES_FILE, concept_shares
from pipeline.files import read_text, write_text_atomically
from pipeline.publish import KEPT_SIGNATURES_FILE, MANIFEST_FILE
from pipeline.signatures import SignatureTable, encode
from solvers.problem import REPRESENTATION
from solvers.solution import BalanceSolution

log = logging.getLogger(__name__)

STATS_FILE = "stats.json"
REPORT_FILE = "report.html"
CARD_FILE = "README.md"
# Heat maps show at most this many concepts (the most supported ones) so labels stay readable.
HEATMAP_MAX_CONCEPTS = 40
Q_HISTOGRAM_BINS = 20
# Below this share of annotated rows in the release, the report, the card and the log say that
# balancing constrained a minority of the data: M4 keeps every unannotated row at one common rate.
LOW_COVERAGE = 0.5

PERCEIVED = (
    "\"Perceived\" means what a caption (or an image classifier) *suggests* about the people it shows: "
    "a caption that says \"a woman\" is counted as perceived-gender woman. These labels are never a "
    "person's identity, they miss people the caption does not describe, and they carry the biases of "
    "the words people use. Balancing makes the *data* agree with the requested shares under these "
    "labels; it says nothing certain about any individual.")


def _table_in_space(records, attribute_names, concept_names) -> SignatureTable:
    """Signature records re-encoded on fixed columns (labels outside them are dropped)."""
    records = list(records)
    attributes = encode([r["attributes"] for r in records], attribute_names)
    concepts = encode([r["concepts"] for r in records], concept_names)
    weights = np.array([r["count"] for r in records], dtype=np.float64)
    utility = None
    if any(r.get("utility") is not None for r in records):
        utility = np.array([np.nan if r.get("utility") is None else r["utility"] for r in records])
    return SignatureTable(list(attribute_names), list(concept_names), attributes, concepts, weights, utility)


def read_jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in read_text(path).splitlines() if line.strip()]


def kept_records(release_dir: str) -> list[dict]:
    records = []
    for entry in read_jsonl(FileSystems.join(release_dir, KEPT_SIGNATURES_FILE)):
        attributes, concepts, utility = entry["signature"]
        records.append({"attributes": attributes, "concepts": concepts, "utility": utility,
                        "count": entry["count"]})
    return records


def _bias(table: SignatureTable, solution: BalanceSolution, weights: np.ndarray, min_support: float) -> dict:
    from solvers import data_bias

    spec = solution.spec
    result = data_bias(table.attributes, table.concepts, weights=weights, targets=np.asarray(spec.targets),
                       groups=spec.groups, min_support=min_support, attribute_names=spec.attribute_names,
                       concept_names=spec.concept_names, group_names=spec.group_names,
                       conditional=spec.conditional)
    return result.to_dict()


def _shares(table: SignatureTable, weights: np.ndarray, spec) -> dict:
    """{concept: {"support": {group: n}, "shares": {value: share}}} plus "_overall"."""
    view = SignatureTable(table.attribute_names, table.concept_names, table.attributes, table.concepts,
                          weights, None)
    per_concept = {name: {"support": {}, "shares": {}} for name in spec.concept_names}
    overall = {}
    for group, (columns, overall_share, support, share) in concept_shares(view).items():
        for j, k in enumerate(columns):
            overall[table.attribute_names[k]] = float(overall_share[j])
        for r, name in enumerate(spec.concept_names):
            per_concept[name]["support"][group] = float(support[r])
            for j, k in enumerate(columns):
                per_concept[name]["shares"][table.attribute_names[k]] = (
                    float(share[j, r]) if support[r] > 0 else None)
    return {"overall": overall, "concepts": per_concept}


def _coverage(table: SignatureTable, weights: np.ndarray, spec) -> dict:
    """{group: share of the (weighted) rows with a value of that group annotated}, None if no rows."""
    total = float(weights.sum())
    return {name: (float(weights[table.attributes[:, columns].max(axis=1) > 0].sum()) / total if total > 0 else None)
            for name, columns in zip(spec.group_names, spec.groups)}


def coverage_warnings(stats: dict, name=str) -> list[str]:
    """Plain sentences for each group whose annotations cover less than LOW_COVERAGE of the release
    (`name` renders a group's name for where the sentence goes, e.g. markdown_text for the card)."""
    warnings = []
    for group, share in stats["annotation_coverage"]["realized"].items():
        if share is not None and share < LOW_COVERAGE:
            warnings.append(
                f"only {share:.0%} of the released rows have a {name(group)} annotation: balancing constrains those "
                f"rows alone, and the other {1 - share:.0%} keep whatever association they carry (people a "
                "caption does not name are among them; an image annotator, `--image-model`, can see them)")
    return warnings


def build_statistics(solution: BalanceSolution, signature_records, kept, manifest: dict,
                     annotate_counts: dict | None = None) -> dict:
    """Before / planned / realized statistics of one release, as one JSON-ready dict."""
    spec = solution.spec
    before = _table_in_space(signature_records, spec.attribute_names, spec.concept_names)
    realized = _table_in_space(kept, spec.attribute_names, spec.concept_names)
    min_support = float(solution.statistics.get("min_support", 0))
    utility = None if not solution.utility_tilt else np.nan_to_num(before.utility, nan=solution.utility_mean)
    q_before = solution.q_for(before.attributes, before.concepts, utility)
    realized_weights = realized.weights.copy()
    if manifest.get("mode") == "weights":
        r_utility = None if not solution.utility_tilt else np.nan_to_num(realized.utility, nan=solution.utility_mean)
        realized_weights = realized_weights * solution.q_for(realized.attributes, realized.concepts, r_utility) / solution.keep_rate
    counts = manifest["counts"]
    q_hist, edges = np.histogram(q_before, bins=Q_HISTOGRAM_BINS, range=(0.0, 1.0), weights=before.weights)
    stats = {
        "perceived": PERCEIVED,
        "rows": {"annotated_rows": int(before.weights.sum()), "samples_read": counts["samples_read"],
                 "kept": counts["kept"], "dropped": counts["dropped"], "output_samples": counts["output_samples"],
                 "rate_kept": counts["kept"] / counts["samples_read"] if counts["samples_read"] else 0.0,
                 "planned_rate": float(before.weights @ q_before / max(before.weights.sum(), 1.0))},
        "quarantine": {"annotate": (annotate_counts or {}).get("quarantined_by_reason", {}),
                       "resample": counts["quarantined"]},
        "keep_rate": solution.keep_rate,
        "targets": dict(zip(spec.attribute_names, spec.targets)),
        "gaps": _gaps_in_force(spec),
        "min_support": min_support,
        "data_bias": {"before": _bias(before, solution, before.weights, min_support),
                      "planned": _bias(before, solution, before.weights * q_before, min_support),
                      "realized": _bias(realized, solution, realized_weights, min_support)},
        "shares": {"before": _shares(before, before.weights, spec),
                   "planned": _shares(before, before.weights * q_before, spec),
                   "realized": _shares(realized, realized_weights, spec)},
        "annotation_coverage": {"before": _coverage(before, before.weights, spec),
                                "planned": _coverage(before, before.weights * q_before, spec),
                                "realized": _coverage(realized, realized_weights, spec)},
        "q_distribution": {"edges": edges.tolist(), "rows": q_hist.tolist()},
        "proxies": solution.statistics.get("proxies", []),
        "excluded_low_support": solution.statistics.get("excluded_low_support", {}),
        "mode": manifest.get("mode"), "seed": manifest.get("seed"),
        "solution": {"method": solution.method, "status": solution.status,
                     "max_violation": solution.max_violation, "digest": manifest.get("solution_digest"),
                     "certified_violation": solution.certified_violation, "certificate": solution.certificate()},
        "dropped_concepts": solution.statistics.get("dropped_concepts", []),
        "unconstrained_concepts": solution.statistics.get("unconstrained_concepts", []),
        "price_of_balance": solution.statistics.get("price_of_balance", []),
    }
    return stats


def headline(stats: dict) -> dict:
    """The numbers a person looks at first: data RB and max AB before, planned and realized."""
    out = {}
    for stage in ("before", "planned", "realized"):
        summary = stats["data_bias"][stage]["summary"]
        out[stage] = {"representation_bias": summary["representation_bias"],
                      "association_bias_max": summary["association_bias_max"],
                      "association_bias_mean": summary["association_bias_mean"]}
    return out


def _percent(value) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def coverage_rows(stats: dict) -> list[tuple[str, list[str]]]:
    """(group, [before, planned, realized] as percentages) for the page and the card."""
    coverage = stats["annotation_coverage"]
    return [(group, [_percent(coverage[stage][group]) for stage in ("before", "planned", "realized")])
            for group in coverage["before"]]


def number(value, digits: int = 4) -> str:
    """A statistic for people: 'n/a' where nothing was measured (a share of no rows)."""
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


# Names from the data, made safe for where they are shown ------------------------------------------

def plain_text(label: str) -> str:
    """A label for matplotlib: '$' would start mathtext (and a bad formula fails the whole plot)."""
    return str(label).replace("$", r"\$")


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+!|<>~-])")


def markdown_text(text: str) -> str:
    """Text for Markdown prose and tables: every character Markdown or HTML would read, escaped."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))


def code(text: str) -> str:
    """Inline Markdown code that holds any text: the fence is longer than any run of backticks inside."""
    text = " ".join(str(text).split())
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    return f"{fence} {text} {fence}"


# Plots ---------------------------------------------------------------------------------------------

def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def plot_heatmaps(stats: dict) -> str | None:
    """Attribute share per concept, before and realized, side by side (rows: best-supported concepts)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    before, after = stats["shares"]["before"]["concepts"], stats["shares"]["realized"]["concepts"]
    values = list(stats["targets"])
    concepts = sorted(before, key=lambda c: -sum(before[c]["support"].values()))[:HEATMAP_MAX_CONCEPTS]
    if not concepts:
        return None
    figure, axes = plt.subplots(1, 2, figsize=(4 + 1.2 * len(values), 1.5 + 0.25 * max(len(concepts), 1)),
                                sharey=True)
    for axis, shares, title in ((axes[0], before, "before"), (axes[1], after, "after (release)")):
        grid = np.array([[np.nan if shares[c]["shares"].get(v) is None else shares[c]["shares"][v]
                          for v in values] for c in concepts]).reshape(len(concepts), len(values))
        image = axis.imshow(grid, vmin=0, vmax=1, cmap="coolwarm", aspect="auto")
        axis.set_xticks(range(len(values)), [plain_text(v.split(":", 1)[-1]) for v in values], rotation=45)
        axis.set_yticks(range(len(concepts)), [plain_text(c) for c in concepts])
        axis.set_title(title)
    figure.suptitle("perceived attribute share per concept")
    figure.colorbar(image, ax=axes, shrink=0.6, label="share among annotated rows of the concept")
    return _png(figure)


def _gaps_in_force(spec) -> dict:
    """The gaps the solver enforced (defaults resolved), not the flags as given (None = default)."""
    representation = {gap for gap, concept in zip(spec.unit_gaps, spec.unit_concepts) if concept == REPRESENTATION}
    association = {gap for gap, concept in zip(spec.unit_gaps, spec.unit_concepts) if concept != REPRESENTATION}

    def single(gaps):
        return (next(iter(gaps)) if len(gaps) == 1 else sorted(gaps)) if gaps else None

    return {"representation": single(representation), "association": single(association),
            "constraint_form": spec.constraint_form}


def plot_q(stats: dict) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges, rows = np.array(stats["q_distribution"]["edges"]), np.array(stats["q_distribution"]["rows"])
    figure, axis = plt.subplots(figsize=(6, 3))
    axis.bar(edges[:-1], rows, width=np.diff(edges), align="edge", color="#4a7bb7")
    axis.set_xlabel("keep probability q")
    axis.set_ylabel("annotated rows")
    axis.set_title("distribution of q (rows without attributes all get the same q)")
    return _png(figure)


def plot_price_of_balance(stats: dict) -> str | None:
    """The largest feasible keep rate against the association gap, with the release's own point."""
    curve = stats.get("price_of_balance") or []
    if not curve:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3))
    axis.plot([p["association_gap"] for p in curve], [p["max_keep_rate"] for p in curve], marker="o", color="#4a7bb7")
    gap = stats["gaps"]["association"]
    if isinstance(gap, (int, float)):
        axis.scatter([gap], [stats["keep_rate"]], color="#b7794a", zorder=3, label="this release")
        axis.legend()
    axis.set_xlabel("association gap (share)")
    axis.set_ylabel("largest feasible keep rate")
    axis.set_title("the price of balance")
    return _png(figure)


def plot_proxies(stats: dict) -> str | None:
    proxies = [p for p in stats["proxies"] if "score" in p]
    if not proxies:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 0.8 + 0.3 * len(proxies)))
    axis.barh([plain_text(p["concept"]) for p in proxies][::-1], [p["score"] for p in proxies][::-1], color="#b7794a")
    axis.set_xlabel("support-weighted deviation of attribute share")
    axis.set_title("proxies chosen")
    return _png(figure)


def render_html(stats: dict, manifest: dict) -> str:
    head = headline(stats)
    rows = "".join(
        f"<tr><td>{stage}</td><td>{number(v['representation_bias'])}</td><td>{number(v['association_bias_max'])}</td>"
        f"<td>{number(v['association_bias_mean'])}</td></tr>" for stage, v in head.items())
    images = [("Attribute share per concept", plot_heatmaps(stats)), ("Keep probabilities", plot_q(stats)),
              ("Proxies", plot_proxies(stats)), ("The price of balance", plot_price_of_balance(stats))]
    images = [(title, data) for title, data in images if data]
    figures = "".join(f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' src='data:image/png;base64,{data}'>"
                      for title, data in images)
    counts = stats["rows"]
    coverage = "".join(f"<tr><td>{html.escape(group)}</td>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"
                       for group, cells in coverage_rows(stats))
    warnings = "".join(f"<p><strong>Note:</strong> {html.escape(w)}.</p>" for w in coverage_warnings(stats))
    dropped = "".join(f"<p><strong>Dropped by the plan:</strong> {html.escape(entry['reason'])}.</p>"
                      for entry in stats.get("dropped_concepts", []))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>balancebeam release report</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}td,th{{padding:0.2em 0.8em;text-align:right}}</style>
</head><body>
<h1>balancebeam release report</h1>
<p>{html.escape(PERCEIVED)}</p>
<p>Read {counts['samples_read']} records; kept {counts['kept']} ({counts['rate_kept']:.1%}), dropped {counts['dropped']};
wrote {html.escape(release_summary(manifest))} (mode {html.escape(str(stats['mode']))},
seed {stats['seed']}). Quarantined: {html.escape(json.dumps(stats['quarantine']))}.</p>
<p>Solver: {html.escape(stats['solution'].get('certificate') or stats['solution']['status'])}.</p>
{dropped}
<h2>Data bias</h2>
<table><tr><th>stage</th><th>RB</th><th>AB max</th><th>AB mean (support-weighted)</th></tr>{rows}</table>
<p>RB = max |share - target| over attribute values; AB over (value, concept) pairs with at least
{stats['min_support']:g} annotated rows. "planned" applies q exactly; "realized" is counted in the release.</p>
<h2>Annotation coverage</h2>
<table><tr><th>group</th><th>before</th><th>planned</th><th>realized</th></tr>{coverage}</table>
<p>Share of rows with an annotated value of the group. M4 constrains these rows only; all others are kept at
one common rate.</p>{warnings}
{figures}
</body></html>
"""


# Dataset card --------------------------------------------------------------------------------------

def _versions() -> dict:
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for package in ("balancebeam", "apache-beam", "numpy", "cvxpy", "webdataset"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed (run from source)" if package == "balancebeam" else "unknown"
    return versions


def release_summary(manifest: dict) -> str:
    """What the release holds, in one phrase (a WebDataset release or a subset release)."""
    if manifest.get("format") == "subset":
        files = manifest["files"]
        return (f"subset.npy ({files['subset.npy']['rows']} uids) and keep.parquet ({files['keep.parquet']['rows']} "
                f"rows in {len(files['keep.parquet']['parts'])} part files), {manifest['total_bytes']} bytes; no image "
                "was read or copied")
    shards = manifest["shards"]
    return f"{manifest['counts']['output_samples']} samples in {len(shards)} WebDataset shards, {manifest['total_bytes']} bytes"


def _reading_it(manifest: dict) -> list[str]:
    if manifest.get("format") == "subset":
        return ["subset.npy is DataComp's subset file (sorted uids as two uint64 each); hand it to DataComp's "
                "resharder (`--subset-file subset.npy`). keep.parquet, a folder of Parquet part files read as one "
                "table, has one row per annotated record: key, q (keep probability), copies (0 = dropped), weight.",
                "", "```python", "import numpy as np",
                "import pyarrow.parquet as pq", "uids = np.load(\"subset.npy\", mmap_mode=\"r\")",
                "keep = pq.read_table(\"keep.parquet\").to_pandas()", "```", "",
                "Integrity: manifest.json lists subset.npy and every keep.parquet part with its size and sha256.", ""]
    shards = manifest["shards"]
    pattern = (f"{manifest['prefix']}-{{{shards[0]['name'][-9:-4]}..{shards[-1]['name'][-9:-4]}}}.tar"
               if shards else "(no shards)")
    return ["```python", "import webdataset as wds", f"dataset = wds.WebDataset(\"{pattern}\").decode(\"pil\")",
            "```", "", "sizes.json beside the shards gives each shard's sample count (open_clip reads it).", "",
            "Integrity: manifest.json lists every shard with its size and sha256.", ""]


def dataset_card(stats: dict, manifest: dict, solution: BalanceSolution) -> str:
    head = headline(stats)
    config = solution.statistics.get("config", {})
    members = ("" if manifest.get("format") == "subset" else
               " Every sample keeps all its members byte for byte; its json gains `balance: {q, weight}` (q: keep "
               "probability; weight: training weight, q/eta in weights mode, else 1).")
    lines = [
        "# Balanced image-text release (balancebeam)", "",
        f"{release_summary(manifest)}.{members}", "",
        "## What \"perceived\" means", "", PERCEIVED, "",
        "## How it was made", "",
        "1. annotate: perceived attributes and concepts of every caption (and image, if configured).",
        "2. balance: Multi-Modal Moment Matching (M4, Alabdulmohsin et al., ICLR 2024) chose keep probabilities "
        "closest to uniform subsampling under share-gap constraints.",
        "3. resample: keyed-hash sampling (blake2b of seed and key), so the kept set is the same on any runner.", "",
        f"- keep rate: {solution.keep_rate:.4f} (asked: {solution.statistics.get('keep_rate_requested')})",
        f"- targets: {code(json.dumps(stats['targets'], ensure_ascii=False))}",
        f"- gaps: {code(json.dumps(stats['gaps']))}; minimum support {stats['min_support']:g}",
        f"- solver: {solution.certificate()}",
        f"- mode: {manifest['mode']}, seed: {manifest['seed']}, samples per shard: {manifest['samples_per_shard']}",
        f"- solution digest (sha256 of the duals and configuration that decide q): {manifest['solution_digest']}",
        f"- configuration: {code(json.dumps(config, sort_keys=True, ensure_ascii=False))}",
        f"- versions: {json.dumps(_versions())}", "",
        "## Counts", "",
        f"- records read: {stats['rows']['samples_read']}; kept: {stats['rows']['kept']}; dropped: "
        f"{stats['rows']['dropped']}; quarantined: {code(json.dumps(stats['quarantine']))}",
        f"- proxies: {', '.join(markdown_text(p['concept']) for p in stats['proxies']) or 'none'}",
        f"- concepts left out for low support: {code(json.dumps(stats['excluded_low_support'], ensure_ascii=False))}",
        f"- concepts left unconstrained on purpose (--unconstrained-concepts): "
        f"{', '.join(markdown_text(c['concept']) for c in stats['unconstrained_concepts']) or 'none'}",
        *[f"- dropped by the plan: {markdown_text(entry['reason'])}" for entry in stats["dropped_concepts"]],
        "",
        "## Data bias (before -> after, counted in this release)", "",
        "| | RB | AB max | AB mean |", "|---|---|---|---|",
    ]
    for stage, values in head.items():
        lines.append(f"| {stage} | {number(values['representation_bias'])} | {number(values['association_bias_max'])} | "
                     f"{number(values['association_bias_mean'])} |")
    lines += ["", "## Annotation coverage", "",
              "Share of rows with an annotated value of each group. Balancing constrains these rows only; "
              "every other row is kept at one common rate.", "",
              "| group | before | planned | released |", "|---|---|---|---|"]
    lines += [f"| {markdown_text(group)} | " + " | ".join(cells) + " |" for group, cells in coverage_rows(stats)]
    lines += [f"\n**Note:** {warning}." for warning in coverage_warnings(stats, name=markdown_text)]
    lines += ["", "## Reading it", "", *_reading_it(manifest)]
    return "\n".join(lines)


def report(solution_path: str, signatures_path: str, release_dir: str, annotations_dir: str | None = None,
           output_dir: str | None = None) -> dict:
    """Write stats.json, report.html and README.md; return the statistics."""
    output_dir = output_dir or release_dir
    solution = BalanceSolution.from_json(read_text(solution_path))
    manifest = json.loads(read_text(FileSystems.join(release_dir, MANIFEST_FILE)))
    annotate_counts = None
    if annotations_dir and FileSystems.exists(FileSystems.join(annotations_dir, "counts.json")):
        annotate_counts = json.loads(read_text(FileSystems.join(annotations_dir, "counts.json")))
    stats = build_statistics(solution, read_jsonl(signatures_path), kept_records(release_dir), manifest,
                             annotate_counts)
    write_text_atomically(FileSystems.join(output_dir, STATS_FILE), json.dumps(stats, indent=1) + "\n")
    write_text_atomically(FileSystems.join(output_dir, REPORT_FILE), render_html(stats, manifest))
    write_text_atomically(FileSystems.join(output_dir, CARD_FILE), dataset_card(stats, manifest, solution))
    for warning in coverage_warnings(stats):
        log.warning("%s", warning)
    head = headline(stats)
    log.info("data AB max %s before, %s in the release; report in %s",
             number(head["before"]["association_bias_max"]), number(head["realized"]["association_bias_max"]),
             FileSystems.join(output_dir, REPORT_FILE))
    return stats


def run(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="balancebeam report", description=__doc__.splitlines()[0])
    parser.add_argument("--solution", required=True, help="solution.json from `balancebeam balance`")
    parser.add_argument("--signatures", help=f"{SIGNATURES_FILE} from balance (default: next to --solution)")
    parser.add_argument("--release", required=True, help="release directory from `balancebeam resample`")
    parser.add_argument("--annotations", help="annotate output directory (for its quarantine counts)")
    parser.add_argument("--output", help="where to write stats.json, report.html, README.md (default: --release)")
    args = parser.parse_args(argv)
    signatures = args.signatures or FileSystems.join(
        args.solution.rsplit("/", 1)[0] if "/" in args.solution else ".", SIGNATURES_FILE)
    try:
        report(args.solution, signatures, args.release, args.annotations, args.output)
    except (ValueError, FileNotFoundError) as error:
        print(f"balancebeam report: {error}", file=sys.stderr)
        return 1
    return 0

