"""The resample job (`balancebeam resample`): apply a solution to every record, write the balanced
release.

Annotation rows become keep decisions in batches (pipeline/decide.py), grouped by the input range
they describe; each range is read once and its records meet their decisions by place; kept copies
are ranked along a keyed-hash order and written in shards (pipeline/shards.py). Every element that
crosses a shuffle is a batch, never one record; kept copies go to their ranking bucket as Arrow
files in the work folder, and image bytes are not copied until their shard is written. The job
reconciles its own counts and publishes a manifest only when every record is accounted for
(pipeline/publish.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import uuid

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.typehints import KV

from pipeline import hashing, release, tars, warm_workers
from pipeline.annotate import ANNOTATIONS_GLOB, annotation_rows, read_counts
from pipeline.coders import Batch
from pipeline.counts import COUNTS_TAG, AddCounts, read_total
from pipeline.decide import Decide, ExactThresholds, RepeatCopies
from pipeline.errors import DataError, UsageError
from pipeline.files import delete_matching, read_text, write_json_atomically, write_text_atomically
from pipeline.options import pipeline_options
from pipeline import publish
from pipeline.publish import KEPT_SIGNATURES_FILE, MANIFEST_FILE, SIZES_FILE, prepare_release_dir
from pipeline.quarantine import WriteQuarantine
from pipeline.shards import MISSING_FROM_INPUT, WriteShards, rank_buckets
from pipeline.sources import FORMATS
from pipeline.progress import InputProgress
from pipeline import subset as subset_release
from solvers.solution import BalanceSolution

log = logging.getLogger(__name__)

__all__ = ["KEPT_SIGNATURES_FILE", "MANIFEST_FILE", "SIZES_FILE", "resample", "run"]
_ANNOTATION_COLUMNS = ["key", "shard", "position", "attributes", "concepts", "utility"]
_WORK_DIR_PREFIX = ".resample-work-"
FORMAT_WEBDATASET = "webdataset"
FORMAT_SUBSET = "subset"
OUTPUT_FORMATS = (FORMAT_WEBDATASET, FORMAT_SUBSET)


class Decisions(beam.PTransform):
    """The job's start -> {"decisions": decision batches by input file, "counts": count dicts}.

    Shared by both formats: each annotation row's q and copies from the solution (a side input),
    after exact mode's per-signature thresholds and, in repeat mode, the copies along the order.
    """

    def __init__(self, annotations_dir, solution_path, seed, mode, buckets, output_size=None):
        super().__init__()
        # not `annotations`: a PTransform method
        self.pattern = FileSystems.join(annotations_dir, ANNOTATIONS_GLOB)
        self.solution_path, self.seed, self.mode = solution_path, seed, mode
        self.buckets, self.output_size = buckets, output_size

    def expand(self, pbegin):
        # the solution as a path, read by a worker: its text in the graph was pickled and
        # bz2-compressed three times over when the job started (0.3 s for a 834 kB solution.json)
        solution = (pbegin
                    | "Solution" >> beam.Create([self.solution_path])
                    | "ReadSolution" >> beam.Map(read_text))
        tables = pbegin | "ReadAnnotations" >> beam.io.ReadFromParquetBatched(
            self.pattern, columns=_ANNOTATION_COLUMNS).with_output_types(Batch)
        thresholds = tables | "ExactThresholds" >> ExactThresholds(self.seed, self.mode, solution)
        # Decide reads the annotations again rather than take `tables`: it waits for the thresholds
        # (a side input), so `tables` would cross the runner whole, and Beam's multi-process runner
        # lost 372,000 of 10M annotation rows that way (docs/beam-data-loss.md). Reading twice costs
        # little.
        decided = (
            pbegin
            | "ReadAnnotationsToDecide" >> beam.io.ReadFromParquetBatched(
                self.pattern, columns=_ANNOTATION_COLUMNS).with_output_types(Batch)
            | "Decide" >> beam.ParDo(
                Decide(self.seed, self.mode), beam.pvalue.AsSingleton(solution),
                beam.pvalue.AsSingleton(thresholds)).with_output_types(
                    KV[str, Batch]).with_outputs(COUNTS_TAG, main="decisions"))
        decisions = decided.decisions
        if self.mode == "repeat":
            decisions = decisions | "RepeatCopies" >> RepeatCopies(self.seed, self.output_size,
                                                                   self.buckets)
        return {"decisions": decisions, "counts": decided[COUNTS_TAG]}


class WriteResults(beam.PTransform):
    """Count dicts of every step -> counts.json in the work folder, summed (what the job
    reconciles)."""

    def __init__(self, work_dir: str):
        super().__init__()
        self.work_dir = work_dir

    def expand(self, counts):
        return (counts
                | "AddCounts" >> AddCounts()
                | "WriteCounts" >> beam.Map(_write_json_to,
                                            FileSystems.join(self.work_dir, "counts.json")))


def build_pipeline(pipeline, *, input_glob, annotations_dir, solution_path, output_dir, work_dir,
                   seed, mode, samples_per_shard, prefix, buckets, input_format="auto",
                   key_column="key", caption_column="caption", output_size=None,
                   quarantine_prefix=None, progress_dir=None):
    """The WebDataset resample graph on `pipeline`; its results land in `work_dir` (counts.json,
    shards.json)."""
    decided = pipeline | "Decisions" >> Decisions(annotations_dir, solution_path, seed, mode,
                                                  buckets, output_size)
    written = decided["decisions"] | "WriteShards" >> WriteShards(
        input_glob, input_format, seed, mode, buckets, output_dir, work_dir, prefix,
        samples_per_shard, key_column, caption_column, progress_dir)
    _ = (written["shards"]
         | "AllShards" >> beam.combiners.ToList()
         | "WriteShardList" >> beam.Map(_write_json_to, FileSystems.join(work_dir, "shards.json")))
    _ = (decided["counts"], written["counts"]) | "Results" >> WriteResults(work_dir)
    if quarantine_prefix:
        _ = written["quarantine"] | "WriteQuarantine" >> WriteQuarantine(quarantine_prefix)


def build_subset_pipeline(pipeline, *, annotations_dir, solution_path, output_dir, work_dir, seed,
                          mode, buckets, subset_buckets, output_size=None):
    """The subset graph: decisions from the annotations alone, no input read (pipeline/subset.py).
    """
    decided = pipeline | "Decisions" >> Decisions(annotations_dir, solution_path, seed, mode,
                                                  buckets, output_size)
    released = decided["decisions"] | "SubsetRelease" >> subset_release.SubsetRelease(
        output_dir, work_dir, subset_buckets)
    _ = released["written"] | "WriteFileCounts" >> beam.Map(
        _write_json_to, FileSystems.join(work_dir, "written.json"))
    _ = (decided["counts"], released["counts"]) | "Results" >> WriteResults(work_dir)


def _write_json_to(payload, path):
    write_json_atomically(path, payload, sort_keys=True)
    return path


def check_release_options(mode: str, samples_per_shard: int, output_size, seed: int) -> None:
    if mode not in release.MODES:
        raise UsageError(f"--mode must be one of {', '.join(release.MODES)}, got {mode!r}")
    if samples_per_shard < 1:
        raise UsageError(f"--samples-per-shard must be >= 1, got {samples_per_shard}")
    if output_size is not None and output_size < 1:
        raise UsageError(f"--output-size must be >= 1, got {output_size}")
    if output_size is not None and mode != "repeat":
        raise UsageError(
            "--output-size needs --mode repeat (the other modes keep what the plan keeps)")
    hashing.check_seed(seed)


def resample(input_glob, annotations_dir, solution_path, output_dir, *, seed=release.DEFAULT_SEED,
             mode=release.DEFAULT_MODE, samples_per_shard=release.DEFAULT_SAMPLES_PER_SHARD,
             prefix=release.DEFAULT_PREFIX, input_format="auto", output_size=None, pipeline_args=(),
             allow_approximate=False, output_format=FORMAT_WEBDATASET):
    """Run the resample job, reconcile it, publish the release; return the manifest it wrote.

    output_format "webdataset" writes shards read from the input; "subset" writes subset.npy and
    keep.parquet from the annotations alone (the input is not read; `input_glob` may be None).
    """
    check_release_options(mode, samples_per_shard, output_size, seed)
    if output_format not in OUTPUT_FORMATS:
        raise UsageError(
            f"--output-format must be one of {', '.join(OUTPUT_FORMATS)}, got {output_format!r}")
    tars.check_prefix(prefix)
    subset = output_format == FORMAT_SUBSET
    if input_glob is None:
        globs = []
    else:
        globs = [input_glob] if isinstance(input_glob, str) else list(input_glob)
    if not globs and not subset:
        raise UsageError(
            "--input is needed to write WebDataset shards (only --output-format subset reads none)")
    options = pipeline_options(pipeline_args, "balancebeam resample")
    input_bytes = input_files = 0
    for pattern in [] if subset else globs:
        matched = FileSystems.match([pattern])[0].metadata_list
        input_files += len(matched)
        if not matched:
            raise FileNotFoundError(f"no input files match {pattern!r}")
        input_bytes += sum(m.size_in_bytes for m in matched)
    solution_text = read_text(solution_path)
    # fail here, not on a worker, if it is unreadable
    solution = BalanceSolution.from_json(solution_text)
    release.KeepRule(solution, seed, mode)  # and if it cannot be applied in this mode
    if solution.status != "optimal":
        if not allow_approximate:
            raise DataError(
                f"{solution_path} is not a certified solution: {solution.certificate()}. Re-run "
                "balance (--method exact is the reference solver), or pass --allow-approximate to "
                "release it anyway")
        log.warning("releasing an uncertified solution (--allow-approximate): %s",
                    solution.certificate())
    rows_written = annotation_rows(annotations_dir)
    read_options = _annotate_read_options(annotations_dir, input_format, rows_written)
    output_dir = output_dir.rstrip("/")
    prepare_release_dir(output_dir)
    work_dir = FileSystems.join(output_dir, _WORK_DIR_PREFIX + uuid.uuid4().hex[:12])
    FileSystems.mkdirs(work_dir) if FileSystems.get_scheme(work_dir) is None else None
    quarantine_prefix = FileSystems.join(output_dir, "quarantine", "resample")
    # an earlier run's, which this run's may not overwrite
    delete_matching(quarantine_prefix + "-*.jsonl")
    expected_copies = max(rows_written, output_size or 0)
    buckets = rank_buckets(expected_copies, input_bytes * expected_copies // max(rows_written, 1))
    results = ("counts.json", "written.json") if subset else ("counts.json", "shards.json")
    try:
        # What the workers apply: the solution without its statistics (the report's, two thirds of
        # the file), in the work folder the workers already share with the driver (counts.json),
        # so the release cannot change if solution.json does while the job runs.
        decisive_path = FileSystems.join(work_dir, "solution.json")
        write_text_atomically(decisive_path,
                              dataclasses.replace(solution, statistics={}).to_json())
        with warm_workers.pool(pipeline_args), InputProgress(
                "resample", input_files, options) as progress, beam.Pipeline(
                    options=options) as pipeline:
            if subset:
                subset_release.prepare_keep_dir(output_dir)
                build_subset_pipeline(pipeline, annotations_dir=annotations_dir,
                                      solution_path=decisive_path, output_dir=output_dir,
                                      work_dir=work_dir, seed=seed, mode=mode, buckets=buckets,
                                      subset_buckets=subset_release.bucket_count(rows_written),
                                      output_size=output_size)
            else:
                build_pipeline(pipeline, input_glob=globs, annotations_dir=annotations_dir,
                               solution_path=decisive_path, output_dir=output_dir,
                               work_dir=work_dir, seed=seed, mode=mode,
                               samples_per_shard=samples_per_shard, prefix=prefix, buckets=buckets,
                               output_size=output_size, quarantine_prefix=quarantine_prefix,
                               progress_dir=progress.marker_dir, **read_options)
        counts = read_total(FileSystems.join(work_dir, results[0]))
        written = json.loads(read_text(FileSystems.join(work_dir, results[1])))
        if subset:  # subset.npy from the buckets' uid files, before the work folder goes
            written = {"buckets": written,
                       "subset": subset_release.assemble_subset(written, work_dir, output_dir)}
    finally:
        delete_matching(FileSystems.join(work_dir, "*"))
        if FileSystems.exists(work_dir):
            FileSystems.delete([work_dir])
    exact_counts = solution.exact_counts if mode == "exact" else None
    details = {
        "prefix": prefix, "samples_per_shard": samples_per_shard, "mode": mode, "seed": seed,
        "output_size": output_size, "input": input_glob,
        "solution_digest": release.solution_digest(solution), "solution_status": solution.status,
        "certificate": solution.certificate()
    }
    if subset:
        manifest = subset_release.publish_subset(counts, written, rows_written, exact_counts,
                                                 output_dir, prefix,
                                                 {"format": FORMAT_SUBSET, **details})
    else:
        manifest = publish.publish_shards(counts, written, rows_written, exact_counts, output_dir,
                                          prefix, {"format": FORMAT_WEBDATASET, **details},
                                          quarantine_prefix, samples_per_shard, annotations_dir)
    publish.write_kept_signatures(counts.get("kept_signatures", {}), output_dir)
    write_json_atomically(FileSystems.join(output_dir, MANIFEST_FILE), manifest, indent=1)
    c = manifest["counts"]
    if subset:
        files = manifest["files"]
        subset_file, keep_dir = subset_release.SUBSET_FILE, subset_release.KEEP_DIR
        log.info(
            "decided %d annotated records: kept %d, dropped %d; wrote %s (%d uids) and %s (%d "
            "rows) to %s, no image read (every record accounted for)", c["samples_read"], c["kept"],
            c["dropped"], subset_file, files[subset_file]["rows"], keep_dir,
            files[keep_dir]["rows"], output_dir)
        if c["kept_not_uid"]:
            log.warning(
                "%d kept records have a key that is not a 128-bit hex uid, so %s cannot list them; "
                "%s does", c["kept_not_uid"], subset_file, keep_dir)
        return manifest
    log.info(
        "read %d records: kept %d, dropped %d, quarantined %d; wrote %d samples in %d shards to %s "
        "(every record accounted for)", c["samples_read"], c["kept"], c["dropped"],
        c["records_quarantined"], c["output_samples"], len(manifest["shards"]), output_dir)
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
        log.warning(
            "%s has no readable counts.json: annotate did not finish there, or the annotations "
            "come from elsewhere; reading the input with the default key and caption columns",
            annotations_dir)
        counts = {}
    if "annotated" in counts and counts["annotated"] != rows_written:
        raise DataError(
            f"{annotations_dir} holds {rows_written} annotation rows but annotate wrote "
            f"{counts['annotated']}: the folder changed since; re-run annotate into an empty folder"
        )
    recorded = counts.get("read_options", {})
    if input_format == "auto":
        input_format = recorded.get("input_format", "auto")
    return {"input_format": input_format, "key_column": recorded.get("key_column", "key"),
            "caption_column": recorded.get("caption_column", "caption")}


def add_release_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that say how the release is drawn and laid out (shared with `balancebeam run`)."""
    parser.add_argument(
        "--mode", choices=release.MODES, default=release.DEFAULT_MODE,
        help="exact (default): whole rows per signature so the release itself meets the gaps; "
        "bernoulli: keep each row with probability q; weights: keep q > 0 with weight "
        "q/eta; repeat: copies proportional to q, exactly --output-size samples")
    parser.add_argument("--seed", type=int, default=release.DEFAULT_SEED,
                        help=f"sampling seed, 0 <= seed < 2**{hashing.SEED_BITS}")
    parser.add_argument("--samples-per-shard", type=int, default=release.DEFAULT_SAMPLES_PER_SHARD)
    parser.add_argument("--prefix", default=release.DEFAULT_PREFIX,
                        help="shards are PREFIX-00000.tar, ...")
    parser.add_argument("--output-size", type=int,
                        help="repeat mode: samples in the release (default: as read)")
    parser.add_argument("--allow-approximate", action="store_true",
                        help="release a solution whose status is not optimal (refused otherwise)")
    parser.add_argument(
        "--output-format", choices=OUTPUT_FORMATS, default=FORMAT_WEBDATASET,
        help="webdataset (default): shards with every kept sample's members; subset: DataComp's "
        "subset.npy and keep.parquet (key, q, copies, weight), no image read or copied")


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="balancebeam resample", description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog="examples:\n"
        "  balancebeam resample --input 'shards/*.tar' --annotations out/annotations \\\n"
        "      --solution out/solution.json --output out/release \\\n"
        "      --direct_running_mode=multi_processing --direct_num_workers=2\n"
        "  balancebeam resample --annotations out/annotations --solution out/solution.json \\\n"
        "      --output out/release --output-format subset\n")
    parser.add_argument(
        "--input", action="append",
        help="the input the annotations were made from (glob; repeatable); not read, and not "
        "needed, with --output-format subset")
    parser.add_argument("--input-format", choices=FORMATS, default="auto")
    parser.add_argument("--annotations", required=True, help="directory with annotations-*.parquet")
    parser.add_argument("--solution", required=True,
                        help="solution.json from `balancebeam balance`")
    parser.add_argument("--output", required=True, help="release directory")
    add_release_arguments(parser)
    return parser.parse_known_args(argv)


def run(argv=None) -> int:
    args, pipeline_args = parse_args(argv)
    resample(args.input, args.annotations, args.solution, args.output, seed=args.seed,
             mode=args.mode, samples_per_shard=args.samples_per_shard, prefix=args.prefix,
             input_format=args.input_format, output_size=args.output_size,
             pipeline_args=pipeline_args, allow_approximate=args.allow_approximate,
             output_format=args.output_format)
    return 0


if __name__ == "__main__":
    sys.exit(run())
