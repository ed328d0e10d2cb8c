"""The annotate job (`balancebeam annotate`): perceived attributes and concepts of every sample.

Reads WebDataset tars or caption tables, writes annotations-*.parquet, quarantine-*.jsonl,
counts.json.
"""
import argparse
import json
import logging

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import SetupOptions

from pipeline import quarantine, warm_workers
from pipeline.annotators import combine
from pipeline.annotators.lexicon import Lexicon
from pipeline.coders import Batch
from pipeline.bundle_files import WriteQuarantineLines, WriteTables, parquet_writer, publish
from pipeline.counts import AddCounts, read_total
from pipeline.errors import ReconciliationError, UsageError
from pipeline.files import (count_lines, delete_matching, write_json_atomically,
                            write_text_atomically)
from pipeline.dedup import DropDuplicateRows, FindDuplicateKeys, RowGroups
from pipeline.counts import COUNTS_TAG
from pipeline.labelling import AnnotateImages, CheckSamples, LabelText
from pipeline.options import local_worker_threads, pipeline_options
from pipeline.progress import InputProgress
from pipeline.records import ANNOTATION_SCHEMA
from pipeline.inputs import CAPTION_COLUMNS, KEY_COLUMNS, resolve_columns
from pipeline.sources import FORMATS
from pipeline.splits import PlanRanges, ReadRangeBatches
from trainer.images import DEFAULT_MAX_IMAGE_PIXELS, VALIDATION_LEVELS

ANNOTATIONS_PREFIX = "annotations"
QUARANTINE_PREFIX = "quarantine"
COUNTS_FILE = "counts.json"
# Where the job's own counts land before the driver has reconciled them with the files written.
PENDING_COUNTS_FILE = ".counts-pending.json"
# The counts that list the files the job's bundles wrote, {temporary path: rows} (bundle_files).
ANNOTATION_FILES, QUARANTINE_FILES = "annotation_files", "quarantine_files"
ANNOTATIONS_GLOB = ANNOTATIONS_PREFIX + "-*.parquet"
LABEL_SETS_FILE = "label-sets.jsonl"

log = logging.getLogger(__name__)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="balancebeam annotate",
        description="Annotate image-text pairs with perceived attributes and concepts (Beam job). "
        "Flags not listed here go to Beam (--runner, --direct_num_workers, ...).",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog="examples:\n"
        "  balancebeam annotate --input 'shards/*.tar' --output out/annotations \\\n"
        "      --direct_running_mode=multi_processing --direct_num_workers=2\n"
        "  balancebeam annotate --input 'pool/*.parquet' --output out/annotations "
        "--prompt-embeddings prompts.npz --embeddings-field l14_img --faces-column face_bboxes\n")
    parser.add_argument(
        "--input", required=True, action="append",
        help="glob of input files (repeatable): *.tar, *.parquet, *.jsonl, *.csv, COCO *.json")
    parser.add_argument("--output", required=True, help="output directory (local, gs://, s3://)")
    parser.add_argument("--input-format", default="auto", choices=FORMATS)
    parser.add_argument(
        "--caption-column", default=None,
        help="caption column of tables, or json field of tar samples without a .txt member "
        f"(default: the first of {', '.join(CAPTION_COLUMNS)} a table has; 'caption' in json)")
    parser.add_argument(
        "--key-column", default=None,
        help=f"key column of tables (default: the first of {', '.join(KEY_COLUMNS)} a table has; "
        "without one, FILE#ROW)")
    parser.add_argument(
        "--utility-field", default=None,
        help="numeric field of the sample's json (or a table column) carried as utility")
    parser.add_argument("--lexicon", action="append", default=None,
                        help="lexicon file or directory (repeatable); default: the bundled ones")
    parser.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                        help="decompression-bomb limit: larger images are quarantined")
    parser.add_argument(
        "--validate-images", choices=VALIDATION_LEVELS, default="full",
        help="how much of each tar sample's image is checked: full decode (default); draft (JPEGs "
        "decoded at reduced scale); header (format allow-list and declared size only: broken "
        "pixel data passes); none. bench/annotate.py measures each")
    image = parser.add_argument_group("image zero-shot annotator (optional)")
    image.add_argument("--image-model", default=None, help="open_clip architecture, e.g. ViT-B-32")
    image.add_argument("--image-checkpoint", default=None,
                       help="state-dict file for --image-model (torch.load with weights_only=True)")
    image.add_argument(
        "--image-model-config", default=None,
        help="open_clip model config JSON for a custom architecture (file stem = name)")
    image.add_argument(
        "--image-embedding-field", "--embeddings-field", dest="image_embedding_field", default=None,
        help="use precomputed image embeddings: this json field, table column, .npy member, or "
        "array of the .npz beside each Parquet file (DataComp: l14_img)")
    image.add_argument(
        "--prompt-embeddings", default=None,
        help="prompts.npz from `balancebeam embed-prompts`: score the precomputed embeddings "
        "with it, no model loaded (needs --embeddings-field)")
    image.add_argument(
        "--faces-column", default=None,
        help="a list column (DataComp: face_bboxes): non-empty means a person is visible, empty "
        "means nobody is; it replaces the prompts' margin rule for the image annotator")
    image.add_argument("--image-batch-size", type=int, default=32)
    image.add_argument("--person-margin", type=float, default=None)
    image.add_argument("--concept-top-k", type=int, default=None)
    image.add_argument("--concept-min-probability", type=float, default=None)
    image.add_argument("--combine", default=combine.POLICY_UNION, choices=combine.POLICIES,
                       help="how text and image answers combine per group (default union)")
    image.add_argument(
        "--combine-group", action="append", default=[], metavar="GROUP=POLICY",
        help="policy for one group, e.g. perceived_gender=agreement or concepts=text")
    return parser


def _used_columns(args) -> list[str]:
    """The table columns annotate reads (a DataComp pool's url, sha256, sizes and scores are not
    read)."""
    return [
        name
        for name in ("image_id", args.utility_field, args.faces_column, args.image_embedding_field)
        if name
    ]


def _image_annotator(args, lexicon, threads=None):
    from pipeline.annotators import image as zero_shot

    overrides = {name: value for name, value in (
        ("person_margin", args.person_margin), ("concept_top_k", args.concept_top_k),
        ("concept_min_probability", args.concept_min_probability)) if value is not None}
    config = zero_shot.ZeroShotConfig(
        architecture=args.image_model, checkpoint=args.image_checkpoint,
        model_config=args.image_model_config, batch_size=args.image_batch_size,
        max_image_pixels=args.max_image_pixels, prompt_embeddings=args.prompt_embeddings,
        torch_threads=threads or 0, **overrides)
    return zero_shot.ZeroShotImageAnnotator(config, lexicon.groups, lexicon.concepts)


class Annotate(beam.PTransform):
    """Input globs -> annotation rows in Parquet, quarantine entries in JSONL, counts as data.

    Reads the inputs in ranges (several workers share a big file), labels records in batches, drops
    duplicate keys (only keys are grouped, through files) and writes what is left; every step
    reports its counts, so the job can reconcile them with the files written.
    """

    def __init__(self, args):
        super().__init__()
        self.args = args

    def expand(self, pbegin):
        args = self.args
        lexicon = Lexicon.load(args.lexicon)
        use_images = bool(args.image_model or args.prompt_embeddings)
        output = args.output.rstrip("/")
        read = (
            pbegin
            | "PlanRanges" >> PlanRanges(args.input, args.input_format)
            | "ReadRanges" >> beam.ParDo(ReadRangeBatches(
                args.key_column, args.caption_column,
                args.image_embedding_field if use_images else None,
                getattr(args, "progress_dir", None), _used_columns(args),
                # the text annotator alone takes sample tables (no sample dicts)
                tables=not use_images, utility_field=args.utility_field)).with_output_types(
                    Batch).with_outputs(quarantine.QUARANTINE_TAG, COUNTS_TAG, main="batches"))
        checked = read.batches | "CheckSamples" >> beam.ParDo(
            CheckSamples(args.max_image_pixels, args.validate_images)).with_output_types(
                Batch).with_outputs(quarantine.QUARANTINE_TAG, main="samples")
        rows = checked.samples | "LabelText" >> beam.ParDo(LabelText(
            lexicon, args.utility_field, use_images, args.image_embedding_field,
            args.faces_column)).with_output_types(Batch)
        quarantined = [read[quarantine.QUARANTINE_TAG], checked[quarantine.QUARANTINE_TAG]]
        counts = [read[COUNTS_TAG]]
        if use_images:
            threads = local_worker_threads(pbegin.pipeline.options)
            images = rows | "AnnotateImages" >> beam.ParDo(
                AnnotateImages(_image_annotator(args, lexicon, threads),
                               combine.parse_policies(args.combine, args.combine_group),
                               args.image_batch_size, threads)).with_output_types(
                                   Batch).with_outputs(quarantine.QUARANTINE_TAG, main="rows")
            rows = images.rows
            quarantined.append(images[quarantine.QUARANTINE_TAG])
        spill_dir = FileSystems.join(output, SPILL_DIR)
        duplicates = rows | "FindDuplicateKeys" >> FindDuplicateKeys(spill_dir)
        quarantined.append(duplicates[quarantine.QUARANTINE_TAG])
        groups = rows | "RowGroups" >> beam.ParDo(RowGroups(
            args.utility_field)).with_output_types(Batch).with_outputs(COUNTS_TAG, main="tables")
        counts.append(groups[COUNTS_TAG])
        # Files named per bundle where they are written; the driver names them (bundle_files).
        written = groups.tables | "WriteAnnotations" >> beam.ParDo(WriteTables(
            spill_dir, ANNOTATION_SCHEMA, ANNOTATION_FILES)).with_outputs(COUNTS_TAG,
                                                                          main="paths")
        counts.append(written[COUNTS_TAG])
        places = (duplicates.places
                  | "DuplicatePlaces" >> beam.combiners.ToSet().without_defaults())
        dropped = written.paths | "DropDuplicateRows" >> beam.ParDo(
            DropDuplicateRows(spill_dir, args.utility_field),
            beam.pvalue.AsSingleton(places, default_value=frozenset())).with_outputs(
                COUNTS_TAG, main="none")
        counts.append(dropped[COUNTS_TAG])
        # each step's entries written in its own stage (no stage that gathers them first)
        counts.extend(entries | f"WriteQuarantine{i}" >> beam.ParDo(WriteQuarantineLines(
            spill_dir, QUARANTINE_FILES)) for i, entries in enumerate(quarantined))
        return (tuple(counts)
                | "AddCounts" >> AddCounts()
                | "WriteCounts" >> beam.Map(_write_pending_counts,
                                            FileSystems.join(output, PENDING_COUNTS_FILE)))


def _write_pending_counts(counts, path):
    write_json_atomically(path, counts, sort_keys=True)
    return counts


def annotate_pipeline(pipeline, args):
    """Adds the annotate job to `pipeline`; returns the PCollection holding its one count dict."""
    return pipeline | "Annotate" >> Annotate(args)


# The duplicate-key check's files (dedup.FindDuplicateKeys) and rewritten annotation files
# (dedup.DropDuplicateRows) go here; removed at the end.
SPILL_DIR = ".spill"


def _remove_spill(output):
    spill = FileSystems.join(output, SPILL_DIR)
    delete_matching(FileSystems.join(spill, "*"))
    if FileSystems.exists(spill):
        FileSystems.delete([spill])


def _prepare_output(output):
    """Creates the output directory (and its spill folder) and removes this job's files from an
    earlier run there."""
    try:
        FileSystems.mkdirs(output)
    except Exception:  # exists already (local) or directories are implicit (object stores)
        pass
    _remove_spill(output)
    if FileSystems.get_scheme(output) is None:  # object stores have no folders
        FileSystems.mkdirs(FileSystems.join(output, SPILL_DIR))
    stale = [
        m.path for pattern in (ANNOTATIONS_GLOB, QUARANTINE_PREFIX + "-*.jsonl", COUNTS_FILE,
                               PENDING_COUNTS_FILE, LABEL_SETS_FILE)
        for m in FileSystems.match([FileSystems.join(output, pattern)])[0].metadata_list
    ]
    if stale:
        log.info("removing %d files of an earlier annotate run in %s", len(stale), output)
        FileSystems.delete(stale)


def check_arguments(args) -> None:
    """Refuse flags that cannot work before any job starts (one line each, exit 2)."""
    if args.max_image_pixels < 1:
        raise UsageError(f"--max-image-pixels must be >= 1, got {args.max_image_pixels}")
    if args.image_batch_size < 1:
        raise UsageError(f"--image-batch-size must be >= 1, got {args.image_batch_size}")
    if args.image_embedding_field and not (args.image_model or args.prompt_embeddings):
        raise UsageError(
            "--embeddings-field needs --prompt-embeddings (from `balancebeam embed-prompts`) or "
            "--image-model (whose text tower embeds the prompts)")
    if args.prompt_embeddings and not args.image_embedding_field:
        raise UsageError("--prompt-embeddings scores precomputed image embeddings: name them with "
                         "--embeddings-field (DataComp: l14_img)")
    if args.prompt_embeddings and args.image_model:
        raise UsageError("give --prompt-embeddings or --image-model, not both")
    if args.faces_column and not (args.image_model or args.prompt_embeddings):
        raise UsageError(
            "--faces-column decides who the image annotator sees: it needs --image-model or "
            "--prompt-embeddings")


def reconcile(counts: dict, rows_written: int, quarantine_lines: int, label_set_rows: int) -> None:
    """records read = annotated + quarantined, checked against the files actually written."""
    numbers = {
        "records_read": counts["records_read"], "annotated": counts["annotated"],
        "quarantined": counts["quarantined"], "annotation_rows_written": rows_written,
        "quarantine_lines_written": quarantine_lines, "rows_counted_by_label_set": label_set_rows
    }
    checks = [("annotated + quarantined = records read",
               counts["annotated"] + counts["quarantined"], counts["records_read"]),
              ("annotation rows in the Parquet files = annotated", rows_written,
               counts["annotated"]),
              ("quarantine lines written = quarantined", quarantine_lines, counts["quarantined"]),
              ("rows counted by label set = annotated", label_set_rows, counts["annotated"]),
              ("quarantined by reason = quarantined", sum(counts["quarantined_by_reason"].values()),
               counts["quarantined"])]
    failed = [f"{name}: {left} != {right}" for name, left, right in checks if left != right]
    if failed:
        raise ReconciliationError(
            "annotate did not account for every record, so its output is incomplete (no "
            "counts.json was written and balance and resample will refuse it; re-run the job): " +
            "; ".join(failed) + ". All counts: " + ", ".join(f"{k} {v}"
                                                             for k, v in numbers.items()), numbers)


def run(argv=None, save_main_session=False):
    parser = build_parser()
    args, beam_args = parser.parse_known_args(argv)
    check_arguments(args)
    first_files, input_files = [], 0
    for pattern in args.input:
        matched = FileSystems.match([pattern])[0].metadata_list
        input_files += len(matched)
        if not matched:
            raise FileNotFoundError(f"no input files match {pattern!r}")
        first_files.append(min(m.path for m in matched))
    try:  # a table without its caption column stops here, not as a million quarantined rows
        args.key_column, args.caption_column = resolve_columns(first_files, args.input_format,
                                                               args.key_column, args.caption_column)
    except ValueError as error:
        raise UsageError(str(error)) from None
    options = pipeline_options(beam_args, "balancebeam annotate")
    options.view_as(SetupOptions).save_main_session = save_main_session
    output = args.output.rstrip("/")
    _prepare_output(output)
    log.info("annotating %s into %s", ", ".join(args.input), output)
    try:
        with warm_workers.pool(beam_args), InputProgress(
                "annotate", input_files, options) as progress, beam.Pipeline(
                    options=options) as pipeline:
            args.progress_dir = progress.marker_dir
            annotate_pipeline(pipeline, args)
        pending = FileSystems.join(output, PENDING_COUNTS_FILE)
        counted = read_total(pending)
        _publish_files(output, counted.pop(ANNOTATION_FILES, {}), counted.pop(QUARANTINE_FILES, {}))
    finally:
        _remove_spill(output)
    counts = {
        "records_read": counted.get("records_read", 0), "annotated": counted.get("annotated", 0),
        "quarantined": counted.get("quarantined", 0),
        "quarantined_by_reason": dict(sorted(counted.get("quarantined_by_reason", {}).items())),
        "utility_missing": counted.get("utility_missing", 0)
    }
    label_sets = counted.get("label_sets", {})
    reconcile(counts, annotation_rows(output),
              count_lines(FileSystems.join(output, QUARANTINE_PREFIX + "-*.jsonl")),
              sum(label_sets.values()))
    counts["read_options"] = {"input_format": args.input_format, "key_column": args.key_column,
                              "caption_column": args.caption_column}
    write_text_atomically(
        FileSystems.join(output, LABEL_SETS_FILE), "".join(
            json.dumps({"label_set": json.loads(text), "count": n}) + "\n"
            for text, n in sorted(label_sets.items()) if n))
    write_json_atomically(FileSystems.join(output, COUNTS_FILE), counts, indent=2, sort_keys=True)
    if FileSystems.exists(pending):
        FileSystems.delete([pending])
    reasons = ", ".join(f"{n} {reason}"
                        for reason, n in sorted(counts["quarantined_by_reason"].items()))
    log.info(
        "read %d records: %d annotated, %d quarantined%s; annotations in %s (every record "
        "accounted for)",
        counts["records_read"], counts["annotated"], counts["quarantined"],
        f" ({reasons})" if reasons else "", FileSystems.join(output, ANNOTATIONS_GLOB))
    if counts.get("utility_missing"):
        log.warning(
            "%d records have no usable --utility-field value (missing, not a number, NaN or "
            "infinite); they count as average utility", counts["utility_missing"])
    return 0


def _publish_files(output, annotation_files, quarantine_files):
    """The files the job's committed bundles wrote in the spill folder, renamed to
    annotations-SSSSS-of-NNNNN.parquet and quarantine-SSSSS-of-NNNNN.jsonl; where a job wrote none
    of a kind (no row annotated, none quarantined), one empty file of it, as Beam's sinks leave."""
    for files, prefix, suffix in ((annotation_files, ANNOTATIONS_PREFIX, ".parquet"),
                                  (quarantine_files, QUARANTINE_PREFIX, ".jsonl")):
        names = publish(files, FileSystems.join(output, prefix), suffix)
        if names:
            continue
        with FileSystems.create(FileSystems.join(output, f"{prefix}-00000-of-00001{suffix}"),
                                compression_type="uncompressed") as handle:
            if suffix == ".parquet":
                parquet_writer(handle, ANNOTATION_SCHEMA).close()


def annotation_rows(directory) -> int:
    """Rows in an annotate output's Parquet files, from their footers (independent of any Beam job).
    """
    paths = [m.path for m in FileSystems.match(
        [FileSystems.join(str(directory).rstrip("/"), ANNOTATIONS_GLOB)])[0].metadata_list]
    if not paths:
        raise FileNotFoundError(
            f"no {ANNOTATIONS_GLOB} in {directory}; run `balancebeam annotate` first")
    return sum(parquet_rows(path) for path in paths)


def parquet_rows(path: str) -> int:
    """Rows of one Parquet file, from its footer."""
    import pyarrow.parquet as pq

    with FileSystems.open(path, compression_type="uncompressed") as handle:
        return pq.ParquetFile(handle).metadata.num_rows


def read_annotations(directory):
    """All annotations-*.parquet shards of an annotate output as one pyarrow Table, sorted by key.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = sorted(m.path for m in FileSystems.match(
        [FileSystems.join(str(directory).rstrip("/"), ANNOTATIONS_GLOB)])[0].metadata_list)
    if not paths:
        raise FileNotFoundError(f"no {ANNOTATIONS_GLOB} in {directory}")
    tables = []
    for path in paths:
        with FileSystems.open(path, compression_type="uncompressed") as handle:
            tables.append(pq.read_table(handle, schema=ANNOTATION_SCHEMA))
    table = pa.concat_tables(tables)
    return table.sort_by([("key", "ascending"), ("shard", "ascending"), ("position", "ascending")])


def read_counts(directory):
    with FileSystems.open(FileSystems.join(str(directory).rstrip("/"), COUNTS_FILE)) as handle:
        return json.loads(handle.read())


if __name__ == "__main__":
    logging.getLogger().setLevel(logging.INFO)
    raise SystemExit(run())
