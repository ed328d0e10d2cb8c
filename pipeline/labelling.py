"""The annotate job's steps, each on a batch of records: check, label the text, look at the images.

Every step takes and gives lists (one element per batch, not per record) and reports what it
quarantined as data (count dicts), so the job can reconcile its counts with the files it wrote.
Dropping duplicate keys, and the rows that wait for it, is pipeline/dedup.py.
"""
from __future__ import annotations

import io
import json
import math

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.metrics import Metrics

from pipeline import quarantine
from pipeline.annotators import combine
from pipeline.annotators.text import TextAnnotator
from pipeline.records import ANNOTATION_SCHEMA, LabelSetMemo, annotation_row, annotation_table
from trainer.images import IMAGE_EXTENSIONS
from trainer.images import DEFAULT_MAX_IMAGE_PIXELS, ImageRejected, check_image



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
    """True when the record's face boxes (DataComp's face_bboxes) list at least one face, False when
    the list is empty, None when there is no such signal (the image annotator then decides by its
    prompts)."""
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


class CheckSamples(beam.DoFn):
    """A batch of samples -> the batch of those fit to label; the others -> quarantine entries.

    Fit: a caption that is not blank and, for a sample from a tar, an image checked as far as
    `validate_images` asks (trainer.images.check_image).
    """

    def __init__(self, max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS, validate_images="full"):
        self.max_image_pixels, self.validate_images = max_image_pixels, validate_images

    def process(self, samples):
        if isinstance(samples, pa.Table):  # a sample table (splits.ReadRangeBatches): no images
            yield from self._check_table(samples)
            return
        fit = []
        for sample in samples:
            rejected = self._rejected(sample)
            if rejected is None:
                fit.append(sample)
            else:
                yield rejected
        if fit:
            yield fit

    def _check_table(self, table):
        captions = table.column("caption").to_pylist()
        rejected = [i for i, caption in enumerate(captions)
                    if caption is None or not caption.strip()]
        if rejected:
            keys, shards, positions = (table.column(name).to_pylist()
                                       for name in ("key", "shard", "position"))
            for i in rejected:
                yield self._rejected({"key": keys[i], "shard": shards[i], "position": positions[i],
                                      "caption": captions[i]})
            fit = np.ones(table.num_rows, dtype=bool)
            fit[rejected] = False
            table = table.filter(fit)
        if table.num_rows:
            yield table

    def _rejected(self, sample):
        caption = sample.get("caption")
        if caption is None:
            return quarantine.sample_quarantined(sample, quarantine.STAGE_ANNOTATE,
                                                 quarantine.MISSING_CAPTION, "no caption")
        if not caption.strip():
            return quarantine.sample_quarantined(sample, quarantine.STAGE_ANNOTATE,
                                                 quarantine.EMPTY_CAPTION, "blank caption")
        if sample.get("members"):  # WebDataset samples must carry an image that decodes
            image = image_member(sample["members"])
            if image is None:
                return quarantine.sample_quarantined(sample, quarantine.STAGE_DECODE,
                                                     quarantine.MISSING_IMAGE,
                                                     f"members: {sorted(sample['members'])}")
            try:
                check_image(image, self.validate_images, self.max_image_pixels)
            except ImageRejected as rejected:
                return quarantine.sample_quarantined(sample, quarantine.STAGE_DECODE,
                                                     rejected.reason, rejected)
        return None


class LabelText(beam.DoFn):
    """A batch of checked samples -> one table of annotation rows, labelled by the text lexicon:
    the batch's captions labelled together, the table built by column (records.annotation_table).

    With `pass_images` it yields, instead, per sample {"row", "image", "embedding", "text_evidence",
    "person_visible"}: what AnnotateImages combines with the image annotator's answer.
    """

    def __init__(self, lexicon, utility_field=None, pass_images=False, embedding_field=None,
                 faces_column=None):
        self.annotator = TextAnnotator(lexicon)
        self.utility_field = utility_field
        self.pass_images = pass_images
        self.embedding_field = embedding_field
        self.faces_column = faces_column
        self.annotated = Metrics.counter(quarantine.METRICS_NAMESPACE, "annotated_text")

    def process(self, samples):
        self.annotated.inc(len(samples))
        if self.pass_images:
            yield [self._with_image(sample) for sample in samples]
            return
        if isinstance(samples, pa.Table):  # a sample table: its columns are the rows'
            codes, answers = self.annotator.label_batch(samples.column("caption").to_pylist())
            yield annotation_table(samples, codes, answers)
            return
        codes, answers = self.annotator.label_batch([sample["caption"] for sample in samples])
        utilities = None
        if self.utility_field:
            utilities = [utility_of(sample.get("meta") or {}, self.utility_field)
                         for sample in samples]
        yield annotation_table(samples, codes, answers, utilities)

    def _with_image(self, sample):
        """What AnnotateImages needs of one sample: its text-labelled row, image or embedding."""
        attributes, concepts, evidence, evidence_json = self.annotator.labels(sample["caption"])
        meta = sample.get("meta") or {}
        row = annotation_row(sample, attributes, concepts, evidence_json,
                             utility_of(meta, self.utility_field))
        members = sample.get("members") or {}
        # a table row's, read with its file (.npz beside a Parquet)
        embedding = sample.get("embedding")
        if self.embedding_field and embedding is None:
            embedding = meta.get(self.embedding_field)
            if members.get(self.embedding_field) is not None:
                embedding = _load_npy(members[self.embedding_field])
        return {
            "row": row, "image": image_member(members) if members else None, "embedding": embedding,
            "text_evidence": evidence, "person_visible": person_visible(meta, self.faces_column)
        }


def rows_table(rows):
    """Annotation rows as one pyarrow Table: what crosses a stage boundary (no per-row encoding)."""
    import pyarrow as pa

    return pa.table({name: [row[name] for row in rows]
                     for name in ANNOTATION_SCHEMA.names}, schema=ANNOTATION_SCHEMA)


class AnnotateImages(beam.DoFn):
    """A batch from LabelText -> a table of rows, the zero-shot image answer combined with the
    text's.

    The model sees `batch_size` images at a time; precomputed embeddings are scored a whole batch
    of records at a time (matrix products, no model).
    """

    def __init__(self, image_annotator, policies, batch_size, threads=None):
        self.image_annotator = image_annotator
        self.policies = policies
        self.batch_size = batch_size
        self.threads = threads  # pipeline.options.local_worker_threads
        self._combinations = LabelSetMemo()  # text and image labels -> combined
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
                    entries.append(
                        quarantine.quarantined(quarantine.STAGE_ANNOTATE, quarantine.BAD_EMBEDDING,
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
        # The text annotator's evidence (shared between rows with the same hits: copied before it
        # changes).
        evidence = dict(element["text_evidence"])
        labels = (tuple(row["attributes"]), tuple(row["concepts"]), tuple(image_attributes),
                  tuple(image_concepts))
        # a few thousand distinct label sets: combined once each
        attributes, concepts, sources = self._combinations.get_or_make(
            labels, lambda: combine.combine_annotations(*labels, self.policies))
        if scores:
            evidence["image"] = scores
        evidence.pop("concepts", None)
        if sources:
            evidence["concepts"] = sources
        return dict(row, attributes=list(attributes), concepts=list(concepts),
                    evidence=json.dumps(evidence, sort_keys=True, ensure_ascii=False))
