"""The report's per-concept rows: what the plan did with each concept (its status, in words) and
each concept's support, shares and largest |share - target| before, planned and realized.

Part of stats.json ("concepts", "heatmap"; pipeline/report_stats.py builds the rest); the page's
concept table and heat map read them.
"""
from __future__ import annotations

import numpy as np

from pipeline.plan import concept_shares
from pipeline.signatures import SignatureTable
from solvers.solution import BalanceSolution

STAGES = ("before", "planned", "realized")
# The heat map shows this many concepts: those whose share was furthest from its target before.
HEATMAP_MAX_CONCEPTS = 30

# What a concept is to the plan (stats.json "concepts"[i]["status"]), in the order the page lists
# them.
CONSTRAINED, PROXY, DROPPED = "constrained", "proxy", "dropped"
LOW_SUPPORT, EXEMPT = "low_support", "exempt"
STATUSES = (CONSTRAINED, PROXY, DROPPED, LOW_SUPPORT, EXEMPT)


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
