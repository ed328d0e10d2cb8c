"""The report's numbers: stats.json, built from the counted signatures, the solution and the
release.

Everything report.html and the dataset card show is in the dict `build_statistics` returns (the
page is a view of the file). Schema: docs/release.md, "stats.json".
"""
from __future__ import annotations

import bisect
import collections
import json
import posixpath

import numpy as np
from apache_beam.io.filesystems import FileSystems

from pipeline.plan import concept_shares
from pipeline.files import read_text
from pipeline.publish import KEPT_SIGNATURES_FILE
from pipeline.report_concepts import HEATMAP_MAX_CONCEPTS, STAGES, concept_rows, heatmap_concepts
from pipeline.signatures import SignatureTable, encode
from solvers.spec import REPRESENTATION
from solvers.solution import BalanceSolution

Q_HISTOGRAM_BINS = 20
# Below this share of annotated rows in the release, the report, the card and the log say that
# balancing constrained a minority of the data: M4 keeps every unannotated row at one common rate.
LOW_COVERAGE = 0.5
QUARANTINE_EXAMPLES = 5


PERCEIVED = (
    "\"Perceived\" means what a caption (or an image classifier) *suggests* about the people it "
    "shows: a caption that says \"a woman\" is counted as perceived-gender woman. These labels are "
    "never a person's identity, they miss people the caption does not describe, and they carry the "
    "biases of the words people use. Balancing makes the *data* agree with the requested shares "
    "under these labels; it says nothing certain about any individual.")


def _table_in_space(records, attribute_names, concept_names) -> SignatureTable:
    """Signature records re-encoded on fixed columns (labels outside them are dropped)."""
    records = list(records)
    attributes = encode([r["attributes"] for r in records], attribute_names)
    concepts = encode([r["concepts"] for r in records], concept_names)
    weights = np.array([r["count"] for r in records], dtype=np.float64)
    utility = None
    if any(r.get("utility") is not None for r in records):
        utility = np.array([np.nan if r.get("utility") is None else r["utility"] for r in records])
    return SignatureTable(list(attribute_names), list(concept_names), attributes, concepts, weights,
                          utility)


def read_jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in read_text(path).splitlines() if line.strip()]


def kept_records(release_dir: str) -> list[dict]:
    """The release's kept signatures (over the solution's own columns) with their counts."""
    records = []
    for entry in read_jsonl(FileSystems.join(release_dir, KEPT_SIGNATURES_FILE)):
        attributes, concepts, utility = entry["signature"]
        records.append({"attributes": attributes, "concepts": concepts, "utility": utility,
                        "count": entry["count"]})
    return records


def quarantine_entries(pattern: str):
    """The entries of every quarantine JSONL file matching `pattern` (none if nothing matches)."""
    for metadata in sorted(FileSystems.match([pattern])[0].metadata_list, key=lambda m: m.path):
        yield from read_jsonl(metadata.path)


def quarantine_table(entries_by_job: dict) -> list[dict]:
    """Quarantine entries counted by (job, stage, reason), each with up to QUARANTINE_EXAMPLES
    examples.

    The examples are the first entries in (shard, position, key) order, so two runs show the same
    ones; each is {key, shard (file name only), position, detail}.
    """
    counts, examples = collections.Counter(), collections.defaultdict(list)
    for job, entries in entries_by_job.items():
        for entry in entries:
            group = (job, str(entry.get("stage")), str(entry.get("reason")))
            counts[group] += 1
            shard = posixpath.basename(str(entry.get("shard") or ""))
            position = entry.get("position")
            order = (shard, -1 if position is None else int(position), str(entry.get("key") or ""))
            found = examples[group]
            if len(found) < QUARANTINE_EXAMPLES or order < found[-1][0]:
                example = {"key": entry.get("key"), "shard": shard or None, "position": position,
                           "detail": entry.get("detail", "")}
                bisect.insort(found, (order, example), key=lambda item: item[0])
                del found[QUARANTINE_EXAMPLES:]
    # job, most first
    ordered = sorted(counts.items(), key=lambda item: (item[0][0], -item[1], item[0][1:]))
    return [{"job": job, "stage": stage, "reason": reason, "count": count,
             "examples": [example for _, example in examples[(job, stage, reason)]]}
            for (job, stage, reason), count in ordered]


def _bias(table: SignatureTable, solution: BalanceSolution, weights: np.ndarray,
          min_support: float) -> dict:
    from solvers import data_bias

    spec = solution.spec
    result = data_bias(table.attributes, table.concepts, weights=weights,
                       targets=np.asarray(spec.targets), groups=spec.groups,
                       min_support=min_support, attribute_names=spec.attribute_names,
                       concept_names=spec.concept_names, group_names=spec.group_names,
                       conditional=spec.conditional)
    return result.to_dict()


def _shares(table: SignatureTable, weights: np.ndarray, spec) -> dict:
    """{concept: {"support": {group: n}, "shares": {value: share}}} plus "_overall"."""
    view = SignatureTable(table.attribute_names, table.concept_names, table.attributes,
                          table.concepts, weights, None)
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
    """{group: share of the (weighted) rows with a value of that group annotated}, None if no rows.
    """
    total = float(weights.sum())
    return {
        name: (float(weights[table.attributes[:, columns].max(axis=1) > 0].sum()) / total
               if total > 0 else None)
        for name, columns in zip(spec.group_names, spec.groups)
    }


def _gaps_in_force(spec) -> dict:
    """The gaps the solver enforced (defaults resolved), not the flags as given (None = default)."""
    representation = {
        gap
        for gap, concept in zip(spec.unit_gaps, spec.unit_concepts) if concept == REPRESENTATION
    }
    association = {
        gap
        for gap, concept in zip(spec.unit_gaps, spec.unit_concepts) if concept != REPRESENTATION
    }

    def single(gaps):
        return (next(iter(gaps)) if len(gaps) == 1 else sorted(gaps)) if gaps else None

    return {"representation": single(representation), "association": single(association),
            "constraint_form": spec.constraint_form}


def release_summary(manifest: dict) -> str:
    """What the release holds, in one phrase (a WebDataset release or a subset release)."""
    if manifest.get("format") == "subset":
        files = manifest["files"]
        return (
            f"subset.npy ({files['subset.npy']['rows']} uids) and keep.parquet "
            f"({files['keep.parquet']['rows']} rows in {len(files['keep.parquet']['parts'])} part "
            f"files), {manifest['total_bytes']} bytes; no image was read or copied")
    shards = manifest["shards"]
    return (f"{manifest['counts']['output_samples']} samples in {len(shards)} WebDataset shards, "
            f"{manifest['total_bytes']} bytes")


# The statistics
# -------------------------------------------------------------------------------------

def _rows(counts: dict, before: SignatureTable, q_before: np.ndarray) -> dict:
    read = counts.get("input_records", counts["samples_read"])
    return {
        "annotated_rows": int(before.weights.sum()), "samples_read": counts["samples_read"],
        "input_records": read, "kept": counts["kept"], "dropped": counts["dropped"],
        "quarantined": read - counts["kept"] - counts["dropped"],
        "output_samples": counts["output_samples"],
        "rate_kept": counts["kept"] / counts["samples_read"] if counts["samples_read"] else 0.0,
        "planned_rate": float(before.weights @ q_before / max(before.weights.sum(), 1.0))
    }


def build_statistics(solution: BalanceSolution, signature_records, kept, manifest: dict,
                     annotate_counts: dict | None = None, quarantine: dict | None = None) -> dict:
    """Before / planned / realized statistics of one release, as one JSON-ready dict (stats.json).

    signature_records: balance's counted signatures; kept: the release's kept signatures; manifest:
    the release's manifest; annotate_counts: annotate's counts.json; quarantine: {job: quarantine
    entries} (annotate's and resample's JSONL lines) for the table by stage and reason.
    """
    spec = solution.spec
    signature_records = list(signature_records)
    before = _table_in_space(signature_records, spec.attribute_names, spec.concept_names)
    realized = _table_in_space(kept, spec.attribute_names, spec.concept_names)
    min_support = float(solution.statistics.get("min_support", 0))
    utility = None if not solution.utility_tilt else np.nan_to_num(before.utility,
                                                                   nan=solution.utility_mean)
    q_before = solution.q_for(before.attributes, before.concepts, utility)
    realized_weights = realized.weights.copy()
    if manifest.get("mode") == "weights":
        r_utility = None if not solution.utility_tilt else np.nan_to_num(
            realized.utility, nan=solution.utility_mean)
        q_realized = solution.q_for(realized.attributes, realized.concepts, r_utility)
        realized_weights = realized_weights * q_realized / solution.keep_rate
    exempt = [entry["concept"] for entry in solution.statistics.get("unconstrained_concepts", [])
              if entry.get("seen", True) and entry["concept"] not in spec.concept_names]
    wide = _table_in_space(signature_records, spec.attribute_names, [*spec.concept_names, *exempt])
    concepts = concept_rows(solution, wide, q_before, realized, realized_weights, min_support)
    counts = manifest["counts"]
    q_hist, edges = np.histogram(q_before, bins=Q_HISTOGRAM_BINS, range=(0.0, 1.0),
                                 weights=before.weights)
    stats = {
        "perceived": PERCEIVED,
        "release": {
            "format": manifest.get("format", "webdataset"), "summary": release_summary(manifest),
            "total_bytes": manifest.get("total_bytes")
        },
        "rows": _rows(counts, before, q_before),
        "quarantine": {
            "annotate": (annotate_counts or {}).get("quarantined_by_reason", {}),
            "resample": counts["quarantined"]
        },
        "quarantine_table": quarantine_table(quarantine or {}),
        "keep_rate": solution.keep_rate,
        "keep_rate_requested": solution.statistics.get("keep_rate_requested"),
        "max_keep_rate": solution.statistics.get("max_keep_rate"),
        "targets": dict(zip(spec.attribute_names, spec.targets)),
        "groups": {
            name: [spec.attribute_names[k] for k in columns]
            for name, columns in zip(spec.group_names, spec.groups)
        },
        "gaps": _gaps_in_force(spec),
        "min_support": min_support,
        "data_bias": {
            "before": _bias(before, solution, before.weights, min_support),
            "planned": _bias(before, solution, before.weights * q_before, min_support),
            "realized": _bias(realized, solution, realized_weights, min_support)
        },
        "shares": {
            "before": _shares(before, before.weights, spec),
            "planned": _shares(before, before.weights * q_before, spec),
            "realized": _shares(realized, realized_weights, spec)
        },
        "concepts": concepts,
        "heatmap": {
            "concepts": heatmap_concepts(concepts), "limit": HEATMAP_MAX_CONCEPTS,
            "ranked_by": "largest |share - target| before, among concepts the plan constrained or "
                         "dropped"
        },
        "annotation_coverage": {
            "before": _coverage(before, before.weights, spec),
            "planned": _coverage(before, before.weights * q_before, spec),
            "realized": _coverage(realized, realized_weights, spec)
        },
        "q_distribution": {"edges": edges.tolist(), "rows": q_hist.tolist()},
        "proxies": solution.statistics.get("proxies", []),
        "excluded_low_support": solution.statistics.get("excluded_low_support", {}),
        "mode": manifest.get("mode"),
        "seed": manifest.get("seed"),
        "solution": {
            "method": solution.method, "status": solution.status,
            "max_violation": solution.max_violation, "digest": manifest.get("solution_digest"),
            "certified_violation": solution.certified_violation,
            "certificate": solution.certificate()
        },
        "dropped_concepts": solution.statistics.get("dropped_concepts", []),
        "unconstrained_concepts": solution.statistics.get("unconstrained_concepts", []),
        "price_of_balance": solution.statistics.get("price_of_balance", []),
    }
    stats["coverage_warnings"] = coverage_warnings(stats)
    return stats


def headline(stats: dict) -> dict:
    """The numbers a person looks at first: data RB and max AB before, planned and realized."""
    out = {}
    for stage in STAGES:
        summary = stats["data_bias"][stage]["summary"]
        out[stage] = {"representation_bias": summary["representation_bias"],
                      "association_bias_max": summary["association_bias_max"],
                      "association_bias_mean": summary["association_bias_mean"]}
    return out


def coverage_warnings(stats: dict, name=str) -> list[str]:
    """Plain sentences for each group whose annotations cover less than LOW_COVERAGE of the release
    (`name` renders a group's name for where the sentence goes, e.g. markdown_text for the card)."""
    warnings = []
    for group, share in stats["annotation_coverage"]["realized"].items():
        if share is not None and share < LOW_COVERAGE:
            warnings.append(
                f"only {share:.0%} of the released rows have a {name(group)} annotation: balancing "
                f"constrains those rows alone, and the other {1 - share:.0%} keep whatever "
                "association they carry (people a caption does not name are among them; an image "
                "annotator, `--image-model`, can see them)"
            )
    return warnings


def percent(value) -> str:
    """A share for people: '28.6%', or 'n/a' where nothing was measured."""
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.1%}"


def coverage_rows(stats: dict) -> list[tuple[str, list[str]]]:
    """(group, [before, planned, realized] as percentages) for the page and the card."""
    coverage = stats["annotation_coverage"]
    return [(group, [percent(coverage[stage][group]) for stage in STAGES])
            for group in coverage["before"]]


def number(value, digits: int = 4) -> str:
    """A statistic for people: 'n/a' where nothing was measured (a share of no rows)."""
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"
