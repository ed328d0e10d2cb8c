"""The resample job (`balancebeam resample`): apply a solution to every record, write the balanced release.

Annotation rows become keep decisions in batches (pipeline/decide.py), grouped by the input range
they describe; each range is read once and its records meet their decisions by place; kept copies
are ranked along a keyed-hash order and written in shards (pipeline/shards.py). Every element that
crosses a shuffle is a batch, never one record, and image bytes never cross one at all. The job
reconciles its own counts and publishes a manifest only when every record is accounted for
(pipeline/publish.py).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import uuid

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from pipeline import hashing, release
from pipeline.annotate import ANNOTATIONS_GLOB, annotation_rows, read_counts
from pipeline.counts import add_counts
from pipeline.decide import COUNTS_TAG, Decide, ExactThresholds, RepeatCopies, bucket_offsets, route_to_ranges
from pipeline.errors import DataError, UsageError
from pipeline.files import count_lines, delete_matching, read_text, write_text_atomically
from pipeline.options import pipeline_options
from pipeline import publish
from pipeline.publish import KEPT_SIGNATURES_FILE, MANIFEST_FILE, SIZES_FILE, prepare_release_dir, reconcile
from pipeline.quarantine import QUARANTINE_TAG, WriteQuarantine
from pipeline.shards import (BUCKET_SIZES_TAG, MISSING_FROM_INPUT, RANK_BUCKET_SIZE, ResampleRange, WriteShard,
                             sort_and_rank)
from pipeline.sources import FORMATS
from pipeline.splits import PlanRanges
from solvers.solution import BalanceSolution

log = logging.getLogger(__name__)

__all__ = ["KEPT_SIGNATURES_FILE", "MANIFEST_FILE", "SIZES_FILE", "resample", "run"]
_ANNOTATION_COLUMNS = ["key", "shard", "position", "attributes", "concepts", "utility"]
_WORK_DIR_PREFIX = ".resample-work-"


def build_pipeline(pipeline, *, input_glob, annotations_dir, solution_text, output_dir, work_dir, seed, mode,
                   samples_per_shard, prefix, buckets, input_format="auto", key_column="key",
                   caption_column="caption", output_size=None, quarantine_prefix=None):
    """The resample graph on `pipeline`; its results land in `work_dir` (counts.json, shards.json)."""
    solution = pipeline | "Solution" >> beam.Create([solution_text])
    tables = pipeline | "ReadAnnotations" >> beam.io.ReadFromParquetBatched(
        FileSystems.join(annotations_dir, ANNOTATIONS_GLOB), columns=_ANNOTATION_COLUMNS)
    thresholds = tables | "ExactThresholds" >> ExactThresholds(seed, mode, solution)
    decided = tables | "Decide" >> beam.ParDo(
        Decide(seed, mode), beam.pvalue.AsSingleton(solution), beam.pvalue.AsSingleton(thresholds)).with_outputs(
            COUNTS_TAG, main="decisions")
    decisions = decided.decisions
    if mode == "repeat":
        decisions = decisions | "RepeatCopies" >> RepeatCopies(seed, output_size, buckets)
    ranges = pipeline | "PlanRanges" >> PlanRanges(input_glob, input_format)
    range_starts = (ranges
                    | "RangeStart" >> beam.Map(lambda r: (r["path"], r["first_position"]))
                    | "RangesOfFile" >> beam.GroupByKey()
                    | "SortStarts" >> beam.MapTuple(lambda path, starts: (path, sorted(starts))))
    routed = decisions | "RouteToRanges" >> beam.FlatMap(route_to_ranges, beam.pvalue.AsDict(range_starts))
    per_file = ({"read": ranges | "ByRange" >> beam.Map(lambda r: ((r["path"], r["index"]), r)), "decisions": routed}
                | "ByInputRange" >> beam.CoGroupByKey()
                | "ResampleRange" >> beam.ParDo(ResampleRange(
                    seed, mode, buckets, key_column, caption_column)).with_outputs(
                        QUARANTINE_TAG, COUNTS_TAG, BUCKET_SIZES_TAG, main="kept"))
    offsets = (per_file[BUCKET_SIZES_TAG]
               | "BucketSizes" >> beam.CombinePerKey(sum)
               | "AllSizes" >> beam.combiners.ToList()
               | "Offsets" >> beam.Map(bucket_offsets))
    _ = (per_file.kept
         | "GroupOrderBucket" >> beam.GroupByKey()
         | "SortAndRank" >> beam.FlatMap(sort_and_rank, beam.pvalue.AsSingleton(offsets), samples_per_shard)
         | "GroupByShard" >> beam.GroupByKey()
         | "WriteShard" >> beam.ParDo(WriteShard(output_dir, prefix))
         | "AllShards" >> beam.combiners.ToList()
         | "WriteShardList" >> beam.Map(_write_json_to, FileSystems.join(work_dir, "shards.json")))
    _ = ((decided[COUNTS_TAG], per_file[COUNTS_TAG])
         | "AllCounts" >> beam.Flatten()
         | "AddCounts" >> beam.CombineGlobally(add_counts)
         | "WriteCounts" >> beam.Map(_write_json_to, FileSystems.join(work_dir, "counts.json")))
    if quarantine_prefix:
        _ = per_file[QUARANTINE_TAG] | "WriteQuarantine" >> WriteQuarantine(quarantine_prefix)


def _write_json_to(payload, path):
    write_text_atomically(path, json.dumps(payload, sort_keys=True))
    return path


def check_release_options(mode: str, samples_per_shard: int, output_size, seed: int) -> None:
    if mode not in release.MODES:
        raise UsageError(f"--mode must be one of {', '.join(release.MODES)}, got {mode!r}")
    if samples_per_shard < 1:
        raise UsageError(f"--samples-per-shard must be >= 1, got {samples_per_shard}")
    if output_size is not None and output_size < 1:
        raise UsageError(f"--output-size must be >= 1, got {output_size}")
    if output_size is not None and mode != "repeat":
        raise UsageError("--output-size needs --mode repeat (the other modes keep what the plan keeps)")
    hashing.check_seed(seed)


def resample(input_glob, annotations_dir, solution_path, output_dir, *, seed=release.DEFAULT_SEED,
             mode=release.DEFAULT_MODE, samples_per_shard=release.DEFAULT_SAMPLES_PER_SHARD,
             prefix=release.DEFAULT_PREFIX, input_format="auto", output_size=None, pipeline_args=(),
             allow_approximate=False):
    """Run the resample job, reconcile it, publish the release; return the manifest it wrote."""
    check_release_options(mode, samples_per_shard, output_size, seed)
    release.check_prefix(prefix)
    globs = [input_glob] if isinstance(input_glob, str) else list(input_glob)
    options = pipeline_options(pipeline_args, "balancebeam resample")
    for pattern in globs:
        if not FileSystems.match([pattern])[0].metadata_list:
            raise FileNotFoundError(f"no input files match {pattern!r}")
    solution_text = read_text(solution_path)
    solution = BalanceSolution.from_json(solution_text)  # fail here, not on a worker, if it is unreadable
    release.KeepRule(solution, seed, mode)  # and if it cannot be applied in this mode
    if solution.status != "optimal":
        if not allow_approximate:
            raise DataError(f"{solution_path} is not a certified solution: {solution.certificate()}. Re-run "
                            "balance (--method exact is the reference solver), or pass --allow-approximate to "
                            "release it anyway")
        log.warning("releasing an uncertified solution (--allow-approximate): %s", solution.certificate())
    rows_written = annotation_rows(annotations_dir)
    read_options = _annotate_read_options(annotations_dir, input_format, rows_written)
    output_dir = output_dir.rstrip("/")
    prepare_release_dir(output_dir)
    work_dir = FileSystems.join(output_dir, _WORK_DIR_PREFIX + uuid.uuid4().hex[:12])
    FileSystems.mkdirs(work_dir) if FileSystems.get_scheme(work_dir) is None else None
    quarantine_prefix = FileSystems.join(output_dir, "quarantine", "resample")
    delete_matching(quarantine_prefix + "-*.jsonl")  # an earlier run's, which this run's may not overwrite
    expected_copies = max(rows_written, output_size or 0)
    buckets = max(1, -(-expected_copies // RANK_BUCKET_SIZE))
    try:
        with beam.Pipeline(options=options) as pipeline:
            build_pipeline(pipeline, input_glob=globs, annotations_dir=annotations_dir, solution_text=solution_text,
                           output_dir=output_dir, work_dir=work_dir, seed=seed, mode=mode,
                           samples_per_shard=samples_per_shard, prefix=prefix, buckets=buckets,
                           output_size=output_size, quarantine_prefix=quarantine_prefix, **read_options)
        counts = json.loads(read_text(FileSystems.join(work_dir, "counts.json")))
        shards = json.loads(read_text(FileSystems.join(work_dir, "shards.json")))
    finally:
        delete_matching(FileSystems.join(work_dir, "*"))
        if FileSystems.exists(work_dir):
            FileSystems.delete([work_dir])
    numbers = reconcile(counts, shards, rows_written, count_lines(quarantine_prefix + "-*.jsonl"),
                        samples_per_shard, solution.exact_counts if mode == "exact" else None)
    if not numbers["decisions_joined"] and numbers["samples_read"] and numbers["decisions_read"]:
        raise DataError(
            f"none of the {numbers['samples_read']} records read has an annotation row among the "
            f"{numbers['decisions_read']} in {annotations_dir}: resample finds a record's annotation by its "
            "input file and place in it, so --input must name the files annotate read, where it read them")
    shard_entries = [{name: shard[name] for name in ("name", "samples", "bytes", "sha256")}
                     for shard in sorted(shards, key=lambda s: s["index"])]
    listed = {shard["name"] for shard in shard_entries}
    stale = delete_matching(FileSystems.join(output_dir, f"{prefix}-*"), keep=listed)
    if stale:
        log.info("removed %d files of an earlier run that this release does not list", len(stale))
    manifest = publish.manifest(counts, numbers, shard_entries, {
        "format": "webdataset", "prefix": prefix, "samples_per_shard": samples_per_shard, "mode": mode,
        "seed": seed, "output_size": output_size, "input": input_glob,
        "solution_digest": release.solution_digest(solution), "solution_status": solution.status,
        "certificate": solution.certificate()})
    write_text_atomically(FileSystems.join(output_dir, SIZES_FILE),
                          json.dumps({s["name"]: s["samples"] for s in shard_entries}, indent=1) + "\n")
    publish.write_kept_signatures(counts.get("kept_signatures", {}), output_dir)
    write_text_atomically(FileSystems.join(output_dir, MANIFEST_FILE), json.dumps(manifest, indent=1) + "\n")
    c = manifest["counts"]
    log.info("read %d records: kept %d, dropped %d, quarantined %d; wrote %d samples in %d shards to %s "
             "(every record accounted for)", c["samples_read"], c["kept"], c["dropped"], c["records_quarantined"],
             c["output_samples"], len(manifest["shards"]), output_dir)
    if c["missing_from_input"]:
        log.warning("%d annotated records were not in the input read now (quarantined as %s)",
                    c["missing_from_input"], MISSING_FROM_INPUT)
    return manifest


def _annotate_read_options(annotations_dir: str, input_format: str, rows_written: int) -> dict:
    """How annotate read the input (key and caption columns), so resample reads it the same way.

    Also checks that annotate finished: its counts.json is written only once its rows reconciled.
    """
    try:
        counts = read_counts(annotations_dir)
    except (OSError, ValueError):
        log.warning("%s has no readable counts.json: annotate did not finish there, or the annotations "
                    "come from elsewhere; reading the input with the default key and caption columns",
                    annotations_dir)
        counts = {}
    if "annotated" in counts and counts["annotated"] != rows_written:
        raise DataError(f"{annotations_dir} holds {rows_written} annotation rows but annotate wrote "
                        f"{counts['annotated']}: the folder changed since; re-run annotate into an empty folder")
    recorded = counts.get("read_options", {})
    return {"input_format": input_format if input_format != "auto" else recorded.get("input_format", "auto"),
            "key_column": recorded.get("key_column", "key"),
            "caption_column": recorded.get("caption_column", "caption")}


def add_release_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that say how the release is drawn and laid out (shared with `balancebeam run`)."""
    parser.add_argument("--mode", choices=release.MODES, default=release.DEFAULT_MODE,
                        help="exact (default): whole rows per signature so the release itself meets the gaps; "
                             "bernoulli: keep each row with probability q; weights: keep q > 0 with weight "
                             "q/eta; repeat: copies proportional to q, exactly --output-size samples")
    parser.add_argument("--seed", type=int, default=release.DEFAULT_SEED,
                        help=f"sampling seed, 0 <= seed < 2**{hashing.SEED_BITS}")
    parser.add_argument("--samples-per-shard", type=int, default=release.DEFAULT_SAMPLES_PER_SHARD)
    parser.add_argument("--prefix", default=release.DEFAULT_PREFIX, help="shards are PREFIX-00000.tar, ...")
    parser.add_argument("--output-size", type=int, help="repeat mode: samples in the release (default: as read)")
    parser.add_argument("--allow-approximate", action="store_true",
                        help="release a solution whose status is not optimal (refused otherwise)")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="balancebeam resample", description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, action="append",
                        help="the input the annotations were made from (glob; repeatable)")
    parser.add_argument("--input-format", choices=FORMATS, default="auto")
    parser.add_argument("--annotations", required=True, help="directory with annotations-*.parquet")
    parser.add_argument("--solution", required=True, help="solution.json from `balancebeam balance`")
    parser.add_argument("--output", required=True, help="release directory")
    add_release_arguments(parser)
    return parser.parse_known_args(argv)


def run(argv=None) -> int:
    args, pipeline_args = parse_args(argv)
    resample(args.input, args.annotations, args.solution, args.output, seed=args.seed, mode=args.mode,
             samples_per_shard=args.samples_per_shard, prefix=args.prefix, input_format=args.input_format,
             output_size=args.output_size, pipeline_args=pipeline_args, allow_approximate=args.allow_approximate)
    return 0


if __name__ == "__main__":
    sys.exit(run())
