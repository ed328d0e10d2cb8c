"""Publishing a release: reconcile the job's counts with what it wrote, then the manifest, written
last.

A folder holds a release when it holds a manifest.json; prepare_release_dir removes the old one
(and what describes the old shards) before anything new is written, so a job killed half way
leaves a folder without a manifest, never an old manifest beside new shards.
"""
from __future__ import annotations

import json
import logging

from apache_beam.io.filesystems import FileSystems

from pipeline.errors import DataError, ReconciliationError, UsageError
from pipeline.files import (count_lines, delete_matching, ensure_writable_directory,
                            write_json_atomically, write_text_atomically)
from pipeline.quarantine import STAGE_READ

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
SIZES_FILE = "sizes.json"
KEPT_SIGNATURES_FILE = "kept-signatures.jsonl"
# What a published release holds besides its shards; removed before a new release is written into
# the same folder, so a crash can never leave an old manifest, card or report beside new shards.
REPORT_FILES = ("stats.json", "report.html", "README.md")
# A subset release's files (pipeline/subset.py; keep.parquet is a folder of part files), which an
# earlier release may have left.
SUBSET_FILES = ("subset.npy", "keep.parquet")


def reconcile(counts: dict, shards: list[dict], annotation_rows_written: int, quarantine_lines: int,
              samples_per_shard: int, exact_counts: dict | None = None) -> dict:
    """The job's own accounting; raises ReconciliationError naming every equation that fails."""
    read_quarantined = sum(n for reason, n in counts.get("quarantined", {}).items()
                           if reason.startswith(STAGE_READ + ":"))
    numbers = {
        "annotation_rows_written": annotation_rows_written,
        "decisions_read": counts.get("decisions_read", 0),
        "decisions_grouped_by_range": counts.get("decisions_grouped", 0),
        "decisions_joined": counts.get("decisions_joined", 0),
        "missing_from_input": counts.get("missing_from_input", 0),
        "samples_read": counts.get("samples_read", 0),
        "kept": counts.get("kept", 0),
        "dropped": counts.get("dropped", 0),
        "records_quarantined": counts.get("records_quarantined", 0),
        "read_quarantined": read_quarantined,
        "quarantined_total": sum(counts.get("quarantined", {}).values()),
        "quarantine_lines_written": quarantine_lines,
        "output_samples": counts.get("output_samples", 0),
        "kept_signature_copies": sum(counts.get("kept_signatures", {}).values()),
        "samples_in_shards": sum(shard["samples"] for shard in shards),
        "shards_written": len(shards),
    }
    n = numbers
    expected_shards = -(-n["output_samples"] // samples_per_shard)
    indices = sorted(shard["index"] for shard in shards)
    checks = [
        ("annotation rows read = annotation rows annotate wrote", n["decisions_read"],
         n["annotation_rows_written"]),
        ("annotation rows grouped by input range = annotation rows read",
         n["decisions_grouped_by_range"], n["decisions_read"]),
        ("annotation rows joined + missing from the input = annotation rows read",
         n["decisions_joined"] + n["missing_from_input"], n["decisions_read"]),
        ("kept + dropped = annotation rows joined", n["kept"] + n["dropped"],
         n["decisions_joined"]),
        ("kept + dropped + quarantined at resample = records read",
         n["kept"] + n["dropped"] + n["records_quarantined"], n["samples_read"]),
        ("samples written in shards = output samples", n["samples_in_shards"], n["output_samples"]),
        ("kept copies by signature = output samples", n["kept_signature_copies"],
         n["output_samples"]),
        ("quarantine lines written = records quarantined", n["quarantine_lines_written"],
         n["quarantined_total"]),
        ("shards written = ceil(output samples / samples per shard)", n["shards_written"],
         expected_shards),
    ]
    failed = [f"{name}: {left} != {right}" for name, left, right in checks if left != right]
    if indices != list(range(len(shards))):
        failed.append(f"shard indices are not 0..{len(shards) - 1} each once: {indices[:10]}...")
    short = [
        s["name"] for s in shards
        if s["samples"] != samples_per_shard and s["index"] != len(shards) - 1
    ]
    if short:
        failed.append(f"shards other than the last are not full: {short[:5]}")
    if not n["missing_from_input"]:
        failed += _exact_counts_off(counts, numbers, exact_counts)
    _raise_if_failed(failed, numbers, "the shards written are not a release")
    return numbers


def reconcile_subset(counts: dict, written: dict, annotation_rows_written: int,
                     exact_counts: dict | None = None) -> dict:
    """A subset release's accounting: every annotation row decided once, one keep.parquet row each,
    one subset.npy entry per kept uid."""
    numbers = {
        "annotation_rows_written": annotation_rows_written,
        "decisions_read": counts.get("decisions_read", 0),
        "decisions_decided": counts.get("decided", 0),
        "kept": counts.get("kept", 0),
        "dropped": counts.get("dropped", 0),
        "kept_not_uid": counts.get("kept_not_uid", 0),
        "output_samples": counts.get("output_samples", 0),
        "kept_signature_copies": sum(counts.get("kept_signatures", {}).values()),
        "keep_rows_written": written.get("keep_rows_written", 0),
        "subset_rows_written": written.get("subset_rows_written", 0),
    }
    # The input is not read: the records are the annotated ones, and none is quarantined here.
    numbers.update(samples_read=numbers["decisions_read"],
                   decisions_joined=numbers["decisions_read"], missing_from_input=0,
                   records_quarantined=0, read_quarantined=0, quarantined_total=0)
    n = numbers
    checks = [
        ("annotation rows read = annotation rows annotate wrote", n["decisions_read"],
         n["annotation_rows_written"]),
        ("annotation rows decided = annotation rows read", n["decisions_decided"],
         n["decisions_read"]),
        ("kept + dropped = annotation rows read", n["kept"] + n["dropped"], n["decisions_read"]),
        ("keep.parquet rows = annotation rows read", n["keep_rows_written"], n["decisions_read"]),
        ("subset.npy rows = kept records with a uid", n["subset_rows_written"],
         n["kept"] - n["kept_not_uid"]),
        ("kept copies by signature = output samples", n["kept_signature_copies"],
         n["output_samples"]),
    ]
    failed = [f"{name}: {left} != {right}" for name, left, right in checks if left != right]
    on_disk, listed = written.get("keep_parts_on_disk", []), written.get("keep_parts_written", [])
    if on_disk != listed:
        failed.append(
            f"keep.parquet part files = the parts the job wrote: {on_disk[:5]} != {listed[:5]}")
    failed += _exact_counts_off(counts, numbers, exact_counts)
    _raise_if_failed(failed, numbers, "the files written are not a release")
    return numbers


def _exact_counts_off(counts: dict, numbers: dict, exact_counts: dict | None) -> list[str]:
    """Exact mode: every constrained signature kept exactly the rows the integer program chose."""
    if not exact_counts:
        return []
    kept = counts.get("kept_signatures", {})
    off = [(signature, kept.get(signature, 0), entry[1])
           for signature, entry in sorted(exact_counts.items())
           if entry[2] and kept.get(signature, 0) != entry[1]]
    numbers["signatures_off_their_exact_count"] = len(off)
    if not off:
        return []
    return [
        f"{len(off)} signatures kept other than their exact count (signature, kept, asked): "
        f"{off[:3]}"
    ]


def _raise_if_failed(failed: list[str], numbers: dict, what_was_written: str) -> None:
    if failed:
        raise ReconciliationError(
            "resample did not account for every record, so no manifest was published "
            f"({what_was_written}; re-run the job): " + "; ".join(failed) + ". All counts: " +
            ", ".join(f"{name} {value}" for name, value in numbers.items()), numbers)


def prepare_release_dir(output_dir: str) -> None:
    """Make the folder writable for a release and unpublish whatever release it held.

    The report, card and lists that describe the old shards go first and the manifest last, all
    before anything new is written: a job killed half way through this leaves the old release whole
    (its manifest and shards) or no manifest and nothing that describes the old shards, never a
    report beside a folder that is not a release. From here until the new manifest is written the
    folder is visibly not a release.
    """
    try:
        ensure_writable_directory(output_dir)
    except ValueError as error:
        raise UsageError(str(error)) from None
    manifest = FileSystems.join(output_dir, MANIFEST_FILE)
    had_release = FileSystems.exists(manifest)
    if had_release:
        log.info("unpublishing the release in %s before writing the new one", output_dir)
    for name in (SIZES_FILE, KEPT_SIGNATURES_FILE, *REPORT_FILES, *SUBSET_FILES):
        if FileSystems.exists(FileSystems.join(output_dir, name)):
            FileSystems.delete([FileSystems.join(output_dir, name)])
    if had_release:
        FileSystems.delete([manifest])


def manifest(counts: dict, numbers: dict, shards: list[dict], details: dict) -> dict:
    quarantined = dict(sorted(counts.get("quarantined", {}).items()))
    summary = {
        name: numbers[name]
        for name in ("samples_read", "kept", "dropped", "output_samples", "records_quarantined",
                     "missing_from_input", "decisions_read", "decisions_joined",
                     "quarantined_total")
    }
    summary["quarantined"] = quarantined
    summary["input_records"] = numbers["samples_read"] + numbers["read_quarantined"]
    return {
        **details, "shards": shards, "counts": summary,
        "total_bytes": sum(s["bytes"] for s in shards)
    }


def write_kept_signatures(counts: dict, output_dir: str) -> None:
    lines = [
        json.dumps({"signature": json.loads(s), "count": n}) for s, n in sorted(counts.items())
    ]
    write_text_atomically(FileSystems.join(output_dir, KEPT_SIGNATURES_FILE),
                          "".join(line + "\n" for line in lines))


def publish_shards(counts, shards, rows_written, exact_counts, output_dir, prefix, details,
                   quarantine_prefix, samples_per_shard, annotations_dir) -> dict:
    """Reconcile a WebDataset release, remove an earlier run's shards, write sizes.json; the
    manifest."""
    numbers = reconcile(counts, shards, rows_written, count_lines(quarantine_prefix + "-*.jsonl"),
                        samples_per_shard, exact_counts)
    if not numbers["decisions_joined"] and numbers["samples_read"] and numbers["decisions_read"]:
        raise DataError(
            f"none of the {numbers['samples_read']} records read has an annotation row among the "
            f"{numbers['decisions_read']} in {annotations_dir}: resample finds a record's "
            "annotation by its input file and place in it, so --input must name the files "
            "annotate read, where it read them")
    shard_entries = [{name: shard[name] for name in ("name", "samples", "bytes", "sha256")}
                     for shard in sorted(shards, key=lambda s: s["index"])]
    listed = {shard["name"] for shard in shard_entries}
    stale = delete_matching(FileSystems.join(output_dir, f"{prefix}-*"), keep=listed)
    if stale:
        log.info("removed %d files of an earlier run that this release does not list", len(stale))
    write_json_atomically(FileSystems.join(output_dir, SIZES_FILE),
                          {s["name"]: s["samples"] for s in shard_entries}, indent=1)
    return manifest(counts, numbers, shard_entries, details)
