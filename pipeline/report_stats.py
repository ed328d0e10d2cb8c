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
from pipeline.signatures import SignatureTable, encode
from solvers.problem import REPRESENTATION
from solvers.solution import BalanceSolution

STAGES = ("before", "planned", "realized")
# The heat map shows this many concepts: those whose share was furthest from its target before.
HEATMAP_MAX_CONCEPTS = 30
Q_HISTOGRAM_BINS = 20
# Below this share of annotated rows in the release, the report, the card and the log say that
# balancing constrained a minority of the data: M4 keeps every unannotated row at one common rate.
LOW_COVERAGE = 0.5
QUARANTINE_EXAMPLES = 5

# What a concept is to the plan (stats.json "concepts"[i]["status"]), in the order the page lists
# them.
CONSTRAINED, PROXY, DROPPED = "constrained", "proxy", "dropped"
LOW_SUPPORT, EXEMPT = "low_support", "exempt"
STATUSES = (CONSTRAINED, PROXY, DROPPED, LOW_SUPPORT, EXEMPT)

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
                bisect.insort(found, (order, {
                    "key": entry.get("key"), "shard": shard or None, "position": position,
                    "detail": entry.get("detail", "")
                }), key=lambda item: item[0])
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


# Per-concept rows
# ----------------------------------------------------------------------------------

def _stage_view(table: SignatureTable, weights: np.ndarray) -> dict:
    """One stage of one table: support and shares per concept, and the rows that carry each concept.
    """
    view = SignatureTable(table.attribute_names, table.concept_names, table.attributes,
                          table.concepts, weights, None)
    index = {name: r for r, name in enumerate(table.concept_names)}
    return {"index": index, "names": table.attribute_names, "shares": concept_shares(view),
            "rows": weights @ table.concepts}


def _concept_stage(stage: dict, name: str,
                   targets: dict) -> tuple[dict, dict, float | None, float | None]:
    """(support per group, share per value, largest |share - target|, rows) of one concept in one
    stage."""
    r = stage["index"].get(name)
    if r is None:
        return {}, {}, None, None
    support, shares = {}, {}
    for group, (columns, _, group_support, share) in stage["shares"].items():
        support[group] = float(group_support[r])
        for j, k in enumerate(columns):
            shares[stage["names"][k]] = float(share[j, r]) if group_support[r] > 0 else None
    gaps = [abs(share - targets[value]) for value, share in shares.items() if share is not None]
    return support, shares, (max(gaps) if gaps else None), float(stage["rows"][r])


def _status(name: str, statistics: dict, spec, min_support: float) -> tuple[str, str]:
    """What the plan did with a concept, as a status and a sentence."""
    dropped = {entry["concept"]: entry for entry in statistics.get("dropped_concepts", [])}
    exempt = {entry["concept"] for entry in statistics.get("unconstrained_concepts", [])}
    proxies = {entry["concept"]: entry for entry in statistics.get("proxies", [])}
    excluded = statistics.get("excluded_low_support", {})
    if name in exempt:
        return EXEMPT, (
            "exempted with --unconstrained-concepts (its association is taken as part of what it "
            "is): not constrained, kept like any row without a constrained concept")
    if name in dropped:
        return DROPPED, f"dropped by the plan: {dropped[name]['reason']}"
    low = [group for group in spec.group_names if name in excluded.get(group, [])]
    if low and len(low) == len(spec.group_names):
        return LOW_SUPPORT, (
            f"fewer than {min_support:g} annotated rows: left out of the constraints and of the "
            "AB summary (its shares are too noisy to balance)")
    note = ""
    if low:
        note = f"not constrained for {', '.join(low)} (fewer than {min_support:g} annotated rows); "
    if name in proxies:
        proxy = proxies[name]
        why = (
            "a proxy you listed" if proxy.get("given")
            else f"a proxy: common and skewed (score {proxy.get('score', 0):.4f}), found beyond "
                 "the labels of interest"
        )
        return PROXY, note + why + ", constrained like them"
    return CONSTRAINED, (note + "constrained: every value's share within the association gap of "
                         "its target")


def concept_rows(solution: BalanceSolution, wide: SignatureTable, q: np.ndarray,
                 realized: SignatureTable, realized_weights: np.ndarray,
                 min_support: float) -> list[dict]:
    """One row per concept the plan saw (constrained, proxy, dropped, left out for low support) and
    per concept the user exempted: its status in words, annotated support before, each value's
    share, the largest |share - target| and the rows carrying it, before / planned / realized.

    `wide` holds the counted signatures over the solution's concepts and the exempted ones; the
    release's kept signatures know the solution's concepts only, so an exempted concept has no
    realized numbers (None). Ordered by support before, largest first.
    """
    spec = solution.spec
    targets = dict(zip(spec.attribute_names, spec.targets))
    stages = {
        "before": _stage_view(wide, wide.weights), "planned": _stage_view(wide, wide.weights * q),
        "realized": _stage_view(realized, realized_weights)
    }
    rows = []
    for name in wide.concept_names:
        status, note = _status(name, solution.statistics, spec, min_support)
        row = {
            "concept": name, "status": status, "note": note, "support": {}, "shares": {}, "gap": {},
            "rows": {}
        }
        for stage, view in stages.items():
            support, shares, gap, carried = _concept_stage(view, name, targets)
            if stage == "before":
                row["support"] = support
            row["shares"][stage] = shares or {value: None for value in targets}
            row["gap"][stage] = gap
            row["rows"][stage] = carried
        rows.append(row)
    rows.sort(key=lambda row: (-sum(row["support"].values()), row["concept"]))
    return rows


def heatmap_concepts(concepts: list[dict], limit: int = HEATMAP_MAX_CONCEPTS) -> list[str]:
    """The concepts that moved most: those the plan constrained (or dropped) whose largest
    |share - target| before was largest, at most `limit`."""
    movable = [row for row in concepts if row["status"] in (CONSTRAINED, PROXY, DROPPED)
               and row["gap"]["before"] is not None]
    movable.sort(key=lambda row: (-row["gap"]["before"], row["concept"]))
    return [row["concept"] for row in movable[:limit]]


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
            "before": _shares(before, before.weights,
                              spec), "planned": _shares(before, before.weights * q_before, spec),
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
            "planned": _coverage(before, before.weights * q_before,
                                 spec), "realized": _coverage(realized, realized_weights, spec)
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
