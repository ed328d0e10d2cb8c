"""The annotate job (`balancebeam annotate`): perceived attributes and concepts of every sample.

Reads WebDataset tars or caption tables, writes annotations-*.parquet, quarantine-*.jsonl, counts.json.
"""
import argparse
import json
import logging
import math

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import SetupOptions

from pipeline import quarantine as q
from pipeline.annotators import combine
from trainer.images import DEFAULT_MAX_IMAGE_PIXELS, ImageRejected, decode_image
from pipeline.annotators.lexicon import Lexicon
from pipeline.annotators.text import TextAnnotator
from pipeline.files import count_lines, write_text_atomically
from pipeline.errors import ReconciliationError, UsageError
from pipeline.options import pipeline_options
from pipeline.records import ANNOTATION_SCHEMA, annotation_row
from pipeline.sources import FORMATS, IMAGE_EXTENSIONS, ReadSamples

ANNOTATIONS_PREFIX = "annotations"
QUARANTINE_PREFIX = "quarantine"
COUNTS_FILE = "counts.json"
# Where the job's own counts land before the driver has reconciled them with the files written.
PENDING_COUNTS_FILE = ".counts-pending.json"
ANNOTATIONS_GLOB = ANNOTATIONS_PREFIX + "-*.parquet"
# Images per zero-shot forward pass: Beam's BatchElements adapts between these bounds.
MIN_IMAGE_BATCH = 8

log = logging.getLogger("balancebeam.annotate")


def _image_member(members):
    for extension in IMAGE_EXTENSIONS:
        for name, data in members.items():
            if name.lower() == extension:
                return data
    return None


def _utility(meta, field):
    """The record's utility score, or None when it has none that is a finite number (NaN, "nan",
    infinities and text count as missing: the row is kept at the average score's rate, and
    counts.json says how many)."""
    if not field or meta.get(field) is None or isinstance(meta[field], bool):
        return None
    try:
        value = float(meta[field])
    except (TypeError, ValueError, OverflowError):
        return None
    return value if math.isfinite(value) else None


class AnnotateText(beam.DoFn):
    """Checks a sample (caption, image decodes) and annotates its caption with the lexicon.

    With `pass_images` it emits {"row", "image", "embedding"} for the image annotator;
    otherwise the finished annotations row.
    """

    def __init__(self, lexicon, utility_field=None, max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS,
                 pass_images=False, embedding_field=None):
        self.annotator = TextAnnotator(lexicon)
        self.utility_field = utility_field
        self.max_image_pixels = max_image_pixels
        self.pass_images = pass_images
        self.embedding_field = embedding_field
        self.annotated = Metrics.counter(q.METRICS_NAMESPACE, "annotated_text")
        self.attribute_hits = Metrics.counter(q.METRICS_NAMESPACE, "text_attribute_hits")
        self.concept_hits = Metrics.counter(q.METRICS_NAMESPACE, "text_concept_hits")

    def process(self, sample):
        caption = sample.get("caption")
        if caption is None:
            yield q.sample_quarantined(sample, q.STAGE_ANNOTATE, q.MISSING_CAPTION, "no caption")
            return
        if not caption.strip():
            yield q.sample_quarantined(sample, q.STAGE_ANNOTATE, q.EMPTY_CAPTION, "blank caption")
            return
        image = None
        if sample.get("members"):  # WebDataset samples must carry an image that decodes
            image = _image_member(sample["members"])
            if image is None:
                yield q.sample_quarantined(sample, q.STAGE_DECODE, q.MISSING_IMAGE,
                                           f"members: {sorted(sample['members'])}")
                return
            try:
                decode_image(image, self.max_image_pixels)
            except ImageRejected as rejected:
                yield q.sample_quarantined(sample, q.STAGE_DECODE, rejected.reason, rejected)
                return
        attributes, concepts, evidence = self.annotator(caption)
        self.annotated.inc()
        self.attribute_hits.inc(len(attributes))
        self.concept_hits.inc(len(concepts))
        for label in attributes:
            Metrics.counter(q.METRICS_NAMESPACE, f"text_{label}").inc()
        row = annotation_row(sample, attributes, concepts, evidence,
                             _utility(sample.get("meta") or {}, self.utility_field))
        if not self.pass_images:
            yield row
            return
        embedding = None
        if self.embedding_field:
            embedding = (sample.get("meta") or {}).get(self.embedding_field)
            member = (sample.get("members") or {}).get(self.embedding_field)
            if member is not None:
                embedding = _load_npy(member)
        yield {"row": row, "image": image, "embedding": embedding}


def _load_npy(data):
    import io

    import numpy as np

    return np.load(io.BytesIO(data), allow_pickle=False).ravel().tolist()


class AnnotateImages(beam.DoFn):
    """Runs the zero-shot image annotator on a batch and combines its answer with the text's."""

    def __init__(self, image_annotator, policies):
        self.image_annotator = image_annotator
        self.policies = policies
        self.image_attribute_hits = Metrics.counter(q.METRICS_NAMESPACE, "image_attribute_hits")
        self.image_concept_hits = Metrics.counter(q.METRICS_NAMESPACE, "image_concept_hits")
        self.images_scored = Metrics.counter(q.METRICS_NAMESPACE, "images_scored")

    def setup(self):
        self.image_annotator._loaded()

    def process(self, batch):
        import numpy as np

        with_embedding = [e for e in batch if e["embedding"] is not None]
        with_image = [e for e in batch if e["embedding"] is None and e["image"] is not None]
        text_only = [e for e in batch if e["embedding"] is None and e["image"] is None]
        scored = []
        if with_embedding:
            dim = self.image_annotator.embed_dim
            good = []
            for element in with_embedding:
                vector = np.asarray(element["embedding"], dtype=np.float32).ravel()
                if vector.shape != (dim,) or not np.isfinite(vector).all():
                    row = element["row"]
                    yield q.quarantined(q.STAGE_ANNOTATE, q.BAD_EMBEDDING, row["key"], row["shard"],
                                        row["position"], f"shape {vector.shape}, model wants ({dim},)")
                else:
                    good.append((element, vector))
            if good:
                results = self.image_annotator.annotate_embeddings(np.stack([v for _, v in good]))
                scored.extend(zip([e for e, _ in good], results))
        if with_image:
            results = self.image_annotator.annotate_images([e["image"] for e in with_image])
            self.images_scored.inc(len(with_image))
            scored.extend(zip(with_image, results))
        for element in text_only:
            yield element["row"]
        for element, (image_attributes, image_concepts, scores) in scored:
            self.image_attribute_hits.inc(len(image_attributes))
            self.image_concept_hits.inc(len(image_concepts))
            yield self._combined(element["row"], image_attributes, image_concepts, scores)

    def _combined(self, row, image_attributes, image_concepts, scores):
        evidence = json.loads(row["evidence"])
        attributes, concepts, sources = combine.combine_annotations(
            row["attributes"], row["concepts"], image_attributes, image_concepts, self.policies)
        if scores:
            evidence["image"] = scores
        evidence.pop("concepts", None)
        if sources:
            evidence["concepts"] = sources
        return dict(row, attributes=attributes, concepts=concepts,
                    evidence=json.dumps(evidence, sort_keys=True, ensure_ascii=False))


class KeepFirstOccurrence(beam.DoFn):
    """Of rows sharing a key, keeps the one from the smallest (shard, position); quarantines the rest."""

    def process(self, keyed_rows):
        key, rows = keyed_rows
        rows = sorted(rows, key=lambda row: (row["shard"], row["position"]))
        first = rows[0]
        Metrics.counter(q.METRICS_NAMESPACE, "annotated").inc()
        yield first
        for duplicate in rows[1:]:
            yield q.quarantined(q.STAGE_DEDUPLICATE, q.DUPLICATE_KEY, key, duplicate["shard"],
                                duplicate["position"],
                                f"kept the copy at {first['shard']} position {first['position']}")


class DropDuplicateKeys(beam.PTransform):
    """Rows -> (unique rows, quarantined duplicates); which copy survives does not depend on order."""

    def expand(self, rows):
        return (rows
                | "ByKey" >> beam.Map(lambda row: (row["key"], row))
                | "GroupByKey" >> beam.GroupByKey()
                | "KeepFirst" >> beam.ParDo(KeepFirstOccurrence()).with_outputs(
                    q.QUARANTINE_TAG, main="rows"))


class WriteCounts(beam.PTransform):
    """counts.json: records read, annotated, quarantined in total and by reason."""

    def __init__(self, path):
        super().__init__()
        self.path = path

    def expand(self, labels):
        return (labels
                | "Count" >> beam.combiners.Count.PerElement()
                | "AsDict" >> beam.combiners.ToDict()
                | "Write" >> beam.Map(_write_counts, self.path))


def _write_counts(counted, path):
    counts = {"records_read": counted.get("records_read", 0),
              "annotated": counted.get("annotated", 0),
              "utility_missing": counted.get("utility_missing", 0),
              "quarantined": sum(n for label, n in counted.items() if label.startswith("quarantined:")),
              "quarantined_by_reason": {label.split(":", 1)[1]: n for label, n in sorted(counted.items())
                                        if label.startswith("quarantined:")}}
    with FileSystems.create(path) as handle:
        handle.write(json.dumps(counts, indent=2, sort_keys=True).encode("utf-8"))
    return counts


def build_parser():
    parser = argparse.ArgumentParser(
        prog="balancebeam annotate",
        description="Annotate image-text pairs with perceived attributes and concepts (Beam job). "
                    "Flags not listed here go to Beam (--runner, --direct_num_workers, ...).")
    parser.add_argument("--input", required=True, action="append",
                        help="glob of input files (repeatable): *.tar, *.parquet, *.jsonl, *.csv, COCO *.json")
    parser.add_argument("--output", required=True, help="output directory (local, gs://, s3://)")
    parser.add_argument("--input-format", default="auto", choices=FORMATS)
    parser.add_argument("--caption-column", default="caption", help="caption column or json field")
    parser.add_argument("--key-column", default="key", help="key column of caption tables")
    parser.add_argument("--utility-field", default=None,
                        help="numeric field of the sample's json (or a table column) carried as utility")
    parser.add_argument("--lexicon", action="append", default=None,
                        help="lexicon file or directory (repeatable); default: the bundled ones")
    parser.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                        help="decompression-bomb limit: larger images are quarantined")
    image = parser.add_argument_group("image zero-shot annotator (optional)")
    image.add_argument("--image-model", default=None, help="open_clip architecture, e.g. ViT-B-32")
    image.add_argument("--image-checkpoint", default=None,
                       help="state-dict file for --image-model (torch.load with weights_only=True)")
    image.add_argument("--image-model-config", default=None,
                       help="open_clip model config JSON for a custom architecture (file stem = name)")
    image.add_argument("--image-embedding-field", default=None,
                       help="use precomputed image embeddings from this json field / table column / .npy member")
    image.add_argument("--image-batch-size", type=int, default=32)
    image.add_argument("--person-margin", type=float, default=None)
    image.add_argument("--concept-top-k", type=int, default=None)
    image.add_argument("--concept-min-probability", type=float, default=None)
    image.add_argument("--combine", default=combine.POLICY_UNION, choices=combine.POLICIES,
                       help="how text and image answers combine per group (default union)")
    image.add_argument("--combine-group", action="append", default=[], metavar="GROUP=POLICY",
                       help="policy for one group, e.g. perceived_gender=agreement or concepts=text")
    return parser


def _image_annotator(args, lexicon):
    from pipeline.annotators import image as zero_shot

    overrides = {name: value for name, value in (
        ("person_margin", args.person_margin), ("concept_top_k", args.concept_top_k),
        ("concept_min_probability", args.concept_min_probability)) if value is not None}
    config = zero_shot.ZeroShotConfig(
        architecture=args.image_model, checkpoint=args.image_checkpoint,
        model_config=args.image_model_config, batch_size=args.image_batch_size,
        max_image_pixels=args.max_image_pixels, **overrides)
    return zero_shot.ZeroShotImageAnnotator(config, lexicon.groups, lexicon.concepts)


def annotate_pipeline(pipeline, args):
    """Adds the annotate job to `pipeline`; returns the PCollection of annotations rows."""
    lexicon = Lexicon.load(args.lexicon)
    use_images = bool(args.image_model)
    if args.image_embedding_field and not use_images:
        raise ValueError("--image-embedding-field needs --image-model (prompts are encoded by its text tower)")
    output = args.output.rstrip("/")

    read = pipeline | "Read" >> ReadSamples(args.input, args.input_format, args.caption_column,
                                            args.key_column)
    text = read.samples | "AnnotateText" >> beam.ParDo(AnnotateText(
        lexicon, args.utility_field, args.max_image_pixels, use_images,
        args.image_embedding_field)).with_outputs(q.QUARANTINE_TAG, main="rows")
    quarantined = [read[q.QUARANTINE_TAG], text[q.QUARANTINE_TAG]]
    rows = text.rows
    if use_images:
        policies = combine.parse_policies(args.combine, args.combine_group)
        images = (rows
                  | "BatchForModel" >> beam.BatchElements(
                      min_batch_size=min(MIN_IMAGE_BATCH, args.image_batch_size),
                      max_batch_size=args.image_batch_size)
                  | "AnnotateImages" >> beam.ParDo(AnnotateImages(
                      _image_annotator(args, lexicon), policies)).with_outputs(
                          q.QUARANTINE_TAG, main="rows"))
        rows = images.rows
        quarantined.append(images[q.QUARANTINE_TAG])
    unique = rows | "DropDuplicateKeys" >> DropDuplicateKeys()
    quarantined.append(unique[q.QUARANTINE_TAG])

    unique.rows | "WriteAnnotations" >> beam.io.WriteToParquet(
        FileSystems.join(output, ANNOTATIONS_PREFIX), ANNOTATION_SCHEMA,
        file_name_suffix=".parquet")
    all_quarantined = tuple(quarantined) | "FlattenQuarantine" >> beam.Flatten()
    all_quarantined | "WriteQuarantine" >> q.WriteQuarantine(FileSystems.join(output, QUARANTINE_PREFIX))

    labels = (
        read.samples | "LabelRead" >> beam.Map(lambda _: "records_read"),
        read[q.QUARANTINE_TAG] | "LabelReadQuarantine" >> beam.Map(lambda _: "records_read"),
        unique.rows | "LabelAnnotated" >> beam.Map(lambda _: "annotated"),
        all_quarantined | "LabelQuarantined" >> beam.Map(lambda e: "quarantined:" + e["reason"]),
        unique.rows | "LabelUtilityMissing" >> beam.FlatMap(
            lambda row, wanted: ["utility_missing"] if wanted and row["utility"] is None else [],
            bool(args.utility_field)),
    ) | "FlattenLabels" >> beam.Flatten()
    labels | "WriteCounts" >> WriteCounts(FileSystems.join(output, PENDING_COUNTS_FILE))
    return unique.rows


def _prepare_output(output):
    """Creates the output directory and removes this job's files from an earlier run there."""
    try:
        FileSystems.mkdirs(output)
    except Exception:  # exists already (local) or directories are implicit (object stores)
        pass
    stale = [m.path for pattern in (ANNOTATIONS_GLOB, QUARANTINE_PREFIX + "-*.jsonl", COUNTS_FILE, PENDING_COUNTS_FILE)
             for m in FileSystems.match([FileSystems.join(output, pattern)])[0].metadata_list]
    if stale:
        log.info("removing %d files of an earlier annotate run in %s", len(stale), output)
        FileSystems.delete(stale)


def check_arguments(args) -> None:
    """Refuse flags that cannot work before any job starts (one line each, exit 2)."""
    if args.max_image_pixels < 1:
        raise UsageError(f"--max-image-pixels must be >= 1, got {args.max_image_pixels}")
    if args.image_batch_size < 1:
        raise UsageError(f"--image-batch-size must be >= 1, got {args.image_batch_size}")
    if args.image_embedding_field and not args.image_model:
        raise UsageError("--image-embedding-field needs --image-model (prompts are encoded by its text tower)")


def reconcile(counts: dict, rows_written: int, quarantine_lines: int) -> None:
    """records read = annotated + quarantined, checked against the files actually written."""
    numbers = {"records_read": counts["records_read"], "annotated": counts["annotated"],
               "quarantined": counts["quarantined"], "annotation_rows_written": rows_written,
               "quarantine_lines_written": quarantine_lines}
    checks = [("annotated + quarantined = records read", counts["annotated"] + counts["quarantined"],
               counts["records_read"]),
              ("annotation rows in the Parquet files = annotated", rows_written, counts["annotated"]),
              ("quarantine lines written = quarantined", quarantine_lines, counts["quarantined"])]
    failed = [f"{name}: {left} != {right}" for name, left, right in checks if left != right]
    if failed:
        raise ReconciliationError(
            "annotate did not account for every record, so its output is incomplete (no counts.json was "
            "written and balance and resample will refuse it; re-run the job): " + "; ".join(failed)
            + ". All counts: " + ", ".join(f"{k} {v}" for k, v in numbers.items()), numbers)


def run(argv=None, save_main_session=False):
    parser = build_parser()
    args, beam_args = parser.parse_known_args(argv)
    check_arguments(args)
    for pattern in args.input:
        if not FileSystems.match([pattern])[0].metadata_list:
            raise FileNotFoundError(f"no input files match {pattern!r}")
    options = pipeline_options(beam_args, "balancebeam annotate")
    options.view_as(SetupOptions).save_main_session = save_main_session
    output = args.output.rstrip("/")
    _prepare_output(output)
    log.info("annotating %s into %s", ", ".join(args.input), output)
    with beam.Pipeline(options=options) as pipeline:
        annotate_pipeline(pipeline, args)
    pending = FileSystems.join(output, PENDING_COUNTS_FILE)
    with FileSystems.open(pending) as handle:
        counts = json.loads(handle.read())
    reconcile(counts, annotation_rows(output),
              count_lines(FileSystems.join(output, QUARANTINE_PREFIX + "-*.jsonl")))
    counts["read_options"] = {"input_format": args.input_format, "key_column": args.key_column,
                              "caption_column": args.caption_column}
    write_text_atomically(FileSystems.join(output, COUNTS_FILE), json.dumps(counts, indent=2, sort_keys=True))
    FileSystems.delete([pending])
    log.info("read %d records: %d annotated, %d quarantined %s; annotations in %s (every record accounted for)",
             counts["records_read"], counts["annotated"], counts["quarantined"],
             counts["quarantined_by_reason"], FileSystems.join(output, ANNOTATIONS_GLOB))
    if counts.get("utility_missing"):
        log.warning("%d records have no usable --utility-field value (missing, not a number, NaN or "
                    "infinite); they count as average utility", counts["utility_missing"])
    return 0


def annotation_rows(directory) -> int:
    """Rows in an annotate output's Parquet files, from their footers (independent of any Beam job)."""
    import pyarrow.parquet as pq

    paths = [m.path for m in FileSystems.match(
        [FileSystems.join(str(directory).rstrip("/"), ANNOTATIONS_GLOB)])[0].metadata_list]
    if not paths:
        raise FileNotFoundError(f"no {ANNOTATIONS_GLOB} in {directory}; run `balancebeam annotate` first")
    rows = 0
    for path in paths:
        with FileSystems.open(path, compression_type="uncompressed") as handle:
            rows += pq.ParquetFile(handle).metadata.num_rows
    return rows


def read_annotations(directory):
    """All annotations-*.parquet shards of an annotate output as one pyarrow Table, sorted by key."""
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
