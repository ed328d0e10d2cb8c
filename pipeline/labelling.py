"""The annotate job's steps, each on a batch of records: check and label, look at images, drop duplicates.

Every step takes and gives lists (one element per batch, not per record) and reports what it
quarantined as data (count dicts), so the job can reconcile its counts with the files it wrote.
"""
from __future__ import annotations

import collections
import io
import json
import math
import uuid
import zlib

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from pipeline import quarantine
from pipeline.annotators import combine
from pipeline.annotators.text import TextAnnotator
from pipeline.errors import DataError
from pipeline.file_shuffle import GroupTablesByFile, parts_by_bucket
from pipeline.records import ANNOTATION_SCHEMA, annotation_row, distinct_label_sets
from pipeline.signatures import row_signature
from pipeline.sources import IMAGE_EXTENSIONS
from trainer.images import DEFAULT_MAX_IMAGE_PIXELS, ImageRejected, check_image

COUNTS_TAG = "counts"
# Keys are spread over this many buckets to find duplicates; only (key, file, place) travels.
DEDUP_BUCKETS = 64


def image_member(members):
    for extension in IMAGE_EXTENSIONS:
        for name, data in members.items():
            if name.lower() == extension:
                return data
    return None


def utility_of(meta, field):
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


def person_visible(meta, column):
    """True when the record's face boxes (DataComp's face_bboxes) list at least one face, False when the
    list is empty, None when there is no such signal (the image annotator then decides by its prompts)."""
    if not column or meta.get(column) is None:
        return None
    faces = meta[column]
    if isinstance(faces, str):
        try:
            faces = json.loads(faces)
        except ValueError:
            return None
    try:
        return len(faces) > 0
    except TypeError:
        return None


def _load_npy(data):
    import numpy as np

    return np.load(io.BytesIO(data), allow_pickle=False).ravel().tolist()


class AnnotateBatch(beam.DoFn):
    """A batch of samples -> one list of annotation rows; bad samples -> quarantine entries.

    A sample needs a caption and, when it comes from a tar, an image that decodes. With
    `pass_images` the list holds {"row", "image", "embedding"} for the image annotator instead.
    """

    def __init__(self, lexicon, utility_field=None, max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS,
                 pass_images=False, embedding_field=None, faces_column=None, validate_images="full"):
        self.annotator = TextAnnotator(lexicon)
        self.validate_images = validate_images
        self.utility_field = utility_field
        self.max_image_pixels = max_image_pixels
        self.pass_images = pass_images
        self.embedding_field = embedding_field
        self.faces_column = faces_column
        self.annotated = Metrics.counter(quarantine.METRICS_NAMESPACE, "annotated_text")

    def process(self, samples):
        rows, entries = [], []
        for sample in samples:
            result = self._annotate(sample)
            (entries if isinstance(result, beam.pvalue.TaggedOutput) else rows).append(result)
        self.annotated.inc(len(rows))
        yield from entries
        if rows:
            yield rows if self.pass_images else rows_table(rows)

    def _annotate(self, sample):
        caption = sample.get("caption")
        if caption is None:
            return quarantine.sample_quarantined(sample, quarantine.STAGE_ANNOTATE, quarantine.MISSING_CAPTION,
                                                 "no caption")
        if not caption.strip():
            return quarantine.sample_quarantined(sample, quarantine.STAGE_ANNOTATE, quarantine.EMPTY_CAPTION,
                                                 "blank caption")
        image = None
        if sample.get("members"):  # WebDataset samples must carry an image that decodes
            image = image_member(sample["members"])
            if image is None:
                return quarantine.sample_quarantined(sample, quarantine.STAGE_DECODE, quarantine.MISSING_IMAGE,
                                                     f"members: {sorted(sample['members'])}")
            try:
                check_image(image, self.validate_images, self.max_image_pixels)
            except ImageRejected as rejected:
                return quarantine.sample_quarantined(sample, quarantine.STAGE_DECODE, rejected.reason, rejected)
        attributes, concepts, evidence, evidence_json = self.annotator.labels(caption)
        row = annotation_row(sample, attributes, concepts, evidence_json,
                             utility_of(sample.get("meta") or {}, self.utility_field))
        if not self.pass_images:
            return row
        embedding = sample.get("embedding")  # a table row's, read with its file (.npz beside a Parquet)
        if self.embedding_field and embedding is None:
            embedding = (sample.get("meta") or {}).get(self.embedding_field)
            member = (sample.get("members") or {}).get(self.embedding_field)
            if member is not None:
                embedding = _load_npy(member)
        return {"row": row, "image": image, "embedding": embedding, "text_evidence": evidence,
                "person_visible": person_visible(sample.get("meta") or {}, self.faces_column)}


def rows_table(rows):
    """Annotation rows as one pyarrow Table: what crosses a stage boundary (no per-row encoding)."""
    import pyarrow as pa

    return pa.table({name: [row[name] for row in rows] for name in ANNOTATION_SCHEMA.names}, schema=ANNOTATION_SCHEMA)


class AnnotateImages(beam.DoFn):
    """A batch from AnnotateBatch -> a table of rows, the zero-shot image answer combined with the text's.

    The model sees `batch_size` images at a time; precomputed embeddings are scored a whole batch
    of records at a time (matrix products, no model).
    """

    def __init__(self, image_annotator, policies, batch_size, threads=None):
        self.image_annotator = image_annotator
        self.policies = policies
        self.batch_size = batch_size
        self.threads = threads  # pipeline.options.local_worker_threads
        self._combinations: dict[tuple, tuple] = {}
        self.images_scored = Metrics.counter(quarantine.METRICS_NAMESPACE, "images_scored")

    def setup(self):
        if self.threads:
            import threadpoolctl

            self._thread_limit = threadpoolctl.threadpool_limits(self.threads)
        self.image_annotator._loaded()

    def process(self, elements):
        rows, entries = [], []
        with_embedding = [e for e in elements if e["embedding"] is not None]
        if with_embedding:
            self._score(with_embedding, rows, entries)
        others = [e for e in elements if e["embedding"] is None]
        for start in range(0, len(others), self.batch_size):
            self._score(others[start:start + self.batch_size], rows, entries)
        yield from entries
        if rows:
            yield rows_table(rows)

    def _score(self, batch, rows, entries):
        import numpy as np

        with_embedding = [e for e in batch if e["embedding"] is not None]
        with_image = [e for e in batch if e["embedding"] is None and e["image"] is not None]
        scored = []
        if with_embedding:
            dim = self.image_annotator.embed_dim
            good = []
            for element in with_embedding:
                vector = np.asarray(element["embedding"], dtype=np.float32).ravel()
                if vector.shape != (dim,) or not np.isfinite(vector).all():
                    row = element["row"]
                    entries.append(quarantine.quarantined(quarantine.STAGE_ANNOTATE, quarantine.BAD_EMBEDDING,
                                                          row["key"], row["shard"], row["position"],
                                                          f"shape {vector.shape}, model wants ({dim},)"))
                else:
                    good.append((element, vector))
            if good:
                results = self.image_annotator.annotate_embeddings(
                    np.stack([v for _, v in good]), [e.get("person_visible") for e, _ in good])
                scored.extend(zip([e for e, _ in good], results))
        if with_image:
            results = self.image_annotator.annotate_embeddings(
                self.image_annotator.embed_images([e["image"] for e in with_image]),
                [e.get("person_visible") for e in with_image])
            self.images_scored.inc(len(with_image))
            scored.extend(zip(with_image, results))
        rows.extend(e["row"] for e in batch if e["embedding"] is None and e["image"] is None)
        rows.extend(self._combined(element, image_attributes, image_concepts, scores)
                    for element, (image_attributes, image_concepts, scores) in scored)

    def _combined(self, element, image_attributes, image_concepts, scores):
        row = element["row"]
        # The text annotator's evidence (shared between rows with the same hits: copied before it changes).
        evidence = dict(element["text_evidence"])
        labels = (tuple(row["attributes"]), tuple(row["concepts"]), tuple(image_attributes), tuple(image_concepts))
        combined = self._combinations.get(labels)
        if combined is None:  # a few thousand distinct label sets: combined once each (bounded memo)
            if len(self._combinations) >= 100_000:
                self._combinations.clear()
            combined = self._combinations[labels] = combine.combine_annotations(*labels, self.policies)
        attributes, concepts, sources = combined
        if scores:
            evidence["image"] = scores
        evidence.pop("concepts", None)
        if sources:
            evidence["concepts"] = sources
        return dict(row, attributes=list(attributes), concepts=list(concepts),
                    evidence=json.dumps(evidence, sort_keys=True, ensure_ascii=False))


def _dedup_bucket(key: str) -> int:
    return zlib.crc32(key.encode("utf-8", "surrogatepass")) % DEDUP_BUCKETS  # stable across processes


def _keys_by_bucket(table):
    """A row table -> (bucket, table of its rows' key, shard, position) for each bucket it touches."""
    buckets = [_dedup_bucket(key) for key in table.column("key").to_pylist()]
    return parts_by_bucket(table.select(["key", "shard", "position"]), buckets)


def _duplicates_in_bucket(bucket_and_table):
    """Of the places sharing a key, the first (smallest file, then place) stays; the others go.

    Arrow counts the keys; only the rows of a key seen more than once come to Python.
    """
    import pyarrow.compute as pc

    _, table = bucket_and_table
    counts = table.group_by("key").aggregate([("key", "count")])
    repeated = counts.filter(pc.greater(counts["key_count"], 1)).column("key")
    if not len(repeated):
        return
    places = collections.defaultdict(list)
    table = table.filter(pc.is_in(table["key"], value_set=repeated.combine_chunks()))
    for key, shard, position in zip(*(table.column(name).to_pylist() for name in ("key", "shard", "position"))):
        places[key].append((shard, position))
    for key in sorted(places):
        found = sorted(places[key])
        first_shard, first_position = found[0]
        for shard, position in found[1:]:
            yield beam.pvalue.TaggedOutput(quarantine.QUARANTINE_TAG, quarantine.quarantine_record(
                quarantine.STAGE_DEDUPLICATE, quarantine.DUPLICATE_KEY, key, shard, position,
                f"kept the copy at {first_shard} position {first_position}"))
            yield shard, position


class FindDuplicateKeys(beam.PTransform):
    """Row tables -> the places of rows whose key an earlier row has (main) and their quarantine entries.

    Only (key, file, place) is grouped, through files in `spill_dir` (file_shuffle), so the runner
    carries references rather than a row per record; which copy survives does not depend on order.
    """

    def __init__(self, spill_dir: str):
        super().__init__()
        self.spill_dir = spill_dir

    def expand(self, row_batches):
        return (row_batches
                | "KeysByBucket" >> beam.FlatMap(_keys_by_bucket)
                | "GroupBucket" >> GroupTablesByFile(self.spill_dir)
                | "Duplicates" >> beam.FlatMap(_duplicates_in_bucket).with_outputs(quarantine.QUARANTINE_TAG,
                                                                                   main="places"))


def label_set(attributes, concepts, utility) -> str:
    """What balance needs of a row, before its options (conditional form, utility) are applied."""
    return row_signature(attributes, concepts, utility, conditional=False, use_utility=True)


class SpillRows(beam.DoFn):
    """A table of annotation rows -> (path, rows) of the Parquet file in `spill_dir` that holds it.

    The rows wait for the duplicate keys (a side input, so a stage boundary) as files, and only
    their paths cross the runner: Beam's multi-process runner lost contiguous runs of the large
    elements it carried between stages (docs/beam-data-loss.md), 18,000 to 152,000 of 3 million
    annotated pool rows in each of three runs when the tables themselves crossed.
    """

    def __init__(self, spill_dir: str):
        self.spill_dir = spill_dir

    def process(self, table):
        import pyarrow.parquet as pq

        path = FileSystems.join(self.spill_dir, f"rows-{uuid.uuid4().hex}.parquet")
        sink = io.BytesIO()
        pq.write_table(table, sink, compression="none")
        with FileSystems.create(path) as handle:
            handle.write(sink.getvalue())
        yield path, table.num_rows


def read_spilled(path_and_rows):
    """The table SpillRows wrote, checked against the row count it reported."""
    import pyarrow.parquet as pq

    path, rows = path_and_rows
    with FileSystems.open(path, compression_type="uncompressed") as handle:
        table = pq.read_table(io.BytesIO(handle.read()), schema=ANNOTATION_SCHEMA)
    if table.num_rows != rows:
        raise DataError(f"{path} holds {table.num_rows} rows, {rows} were written: the job's work folder changed "
                        "under it; re-run annotate")
    return table


# Rows per table DropDuplicates hands to the Parquet writer: each table is one row group of
# annotations-*.parquet, and every later job reads (and the runner ships) one table per row group.
ANNOTATION_ROW_GROUP_ROWS = 65_536


class DropDuplicates(beam.DoFn):
    """Spilled tables of rows -> the rows without their duplicates, in tables of about
    ANNOTATION_ROW_GROUP_ROWS rows, and per spilled table the counts of what it keeps.

    The counts: rows kept (`annotated`), rows without a usable utility, and rows per label set (what
    balance counts signatures from, without reading the annotations again).
    """

    def __init__(self, utility_field=None):
        self.utility_field = utility_field
        self.annotated = Metrics.counter(quarantine.METRICS_NAMESPACE, "annotated")
        self._label_sets: dict[tuple, str] = {}  # rows repeat a few thousand label sets

    def _label_set(self, attributes, concepts, utility) -> str:
        labels = (tuple(attributes or ()), tuple(concepts or ()), utility)
        text = self._label_sets.get(labels)
        if text is None:
            if len(self._label_sets) >= 100_000:  # utilities can make every row distinct
                self._label_sets.clear()
            text = self._label_sets[labels] = label_set(attributes, concepts, utility)
        return text

    def _count_label_sets(self, table) -> collections.Counter:
        import numpy as np
        import pyarrow.compute as pc

        distinct = None if pc.any(pc.is_valid(table.column("utility"))).as_py() else distinct_label_sets(table)
        if distinct is None:  # utilities are part of a label set: row by row
            return collections.Counter(map(self._label_set, table.column("attributes").to_pylist(),
                                           table.column("concepts").to_pylist(),
                                           table.column("utility").to_pylist()))
        codes, label_sets = distinct
        counts = collections.Counter()
        for (attributes, concepts), rows in zip(label_sets, np.bincount(codes, minlength=len(label_sets)).tolist()):
            counts[self._label_set(attributes, concepts, None)] += rows
        return counts

    def start_bundle(self):
        self._pending, self._pending_rows = [], 0

    def process(self, spilled, duplicate_places):
        import pyarrow as pa

        table = read_spilled(spilled)
        if duplicate_places:
            places = zip(table.column("shard").to_pylist(), table.column("position").to_pylist())
            table = table.filter(pa.array([place not in duplicate_places for place in places], type=pa.bool_()))
        self.annotated.inc(table.num_rows)
        missing = table.column("utility").null_count if self.utility_field else 0
        yield beam.pvalue.TaggedOutput(COUNTS_TAG, {"annotated": table.num_rows, "utility_missing": missing,
                                                    "label_sets": dict(self._count_label_sets(table))})
        if table.num_rows:
            self._pending.append(table)
            self._pending_rows += table.num_rows
            if self._pending_rows >= ANNOTATION_ROW_GROUP_ROWS:
                yield self._flush()

    def finish_bundle(self):
        if self._pending:
            from apache_beam.transforms.window import GlobalWindows

            yield GlobalWindows.windowed_value(self._flush())

    def _flush(self):
        import pyarrow as pa

        table = pa.concat_tables(self._pending)
        self._pending, self._pending_rows = [], 0
        return table
