"""Record layouts shared by the Beam jobs: the annotations Parquet schema and its row builder.

Downstream jobs (balance, resample, report) read annotations through this schema.
"""
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# Columns of annotations-*.parquet (DESIGN.md, "Files"). `position` is the record's index within
# its source file, so a reader can tell two samples with the same key in one shard apart.
ANNOTATION_SCHEMA = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("shard", pa.string(), nullable=False),
    pa.field("position", pa.int64(), nullable=False),
    pa.field("caption", pa.string()),
    pa.field("image_id", pa.string()),
    pa.field("attributes", pa.list_(pa.string())),
    pa.field("concepts", pa.list_(pa.string())),
    pa.field("utility", pa.float64()),
    pa.field("evidence", pa.string()),
])


def annotation_row(sample, attributes, concepts, evidence_json, utility=None):
    """One annotations row (a dict in ANNOTATION_SCHEMA's column order) for a source sample; the
    evidence comes as its JSON (the text annotator encodes it once per set of hits)."""
    return {
        "key": sample["key"],
        "shard": sample["shard"],
        "position": int(sample.get("position", 0)),
        "caption": sample.get("caption"),
        "image_id": None if sample.get("image_id") is None else str(sample["image_id"]),
        "attributes": sorted(attributes),
        "concepts": sorted(concepts),
        "utility": None if utility is None else float(utility),
        "evidence": evidence_json,
    }


def annotation_table(samples, codes, answers, utilities=None) -> pa.Table:
    """The rows annotation_row makes for `samples`, as one ANNOTATION_SCHEMA table built column by
    column: sample i's (attributes, concepts, _, evidence JSON) is answers[codes[i]]
    (TextAnnotator.label_batch: both lists sorted), so each distinct answer's lists are converted
    to Arrow once and taken, not built per row. utilities: per sample, or None when no sample has
    one.

    samples may be a sample table (table_sources.sample_table): its key, shard, position, caption
    and image_id columns are taken as they are, and its utility column when it has one.
    """
    indices = pa.array(codes, type=pa.int64())

    def per_answer(values, value_type):
        return pa.array(values, type=value_type).take(indices)

    labels = pa.list_(pa.string())
    if isinstance(samples, pa.Table):
        base = [samples.column(name).combine_chunks()
                for name in ("key", "shard", "position", "caption", "image_id")]
        utility = (samples.column("utility").combine_chunks() if "utility" in samples.column_names
                   else pa.nulls(samples.num_rows, pa.float64()))
    else:
        base = [
            pa.array([sample["key"] for sample in samples], pa.string()),
            pa.array([sample["shard"] for sample in samples], pa.string()),
            pa.array([int(sample.get("position", 0)) for sample in samples], pa.int64()),
            pa.array([sample.get("caption") for sample in samples], pa.string()),
            pa.array([None if sample.get("image_id") is None else str(sample["image_id"])
                      for sample in samples], pa.string()),
        ]
        utility = (pa.nulls(len(samples), pa.float64()) if utilities is None else
                   pa.array([None if u is None else float(u) for u in utilities], pa.float64()))
    columns = [
        *base,
        per_answer([answer[0] for answer in answers], labels),  # sorted already
        per_answer([answer[1] for answer in answers], labels),
        utility,
        per_answer([answer[3] for answer in answers], pa.string()),
    ]
    return pa.Table.from_arrays(columns, schema=ANNOTATION_SCHEMA)


# Label sets a LabelSetMemo holds before it starts again: rows repeat a few thousand label sets, but
# utilities (part of a label set) can make every row distinct.
LABEL_SET_MEMO_LIMIT = 100_000


class LabelSetMemo(dict):
    """What a worker derives from a row's label set (its signature, its combined labels, ...),
    computed once per label set and emptied at `limit` entries, so memory stays bounded when label
    sets rarely repeat."""

    def __init__(self, limit: int = LABEL_SET_MEMO_LIMIT):
        super().__init__()
        self.limit = limit

    def get_or_make(self, labels, make):
        """The value for `labels`, from make() the first time it is asked for since a reset."""
        value = self.get(labels)
        return self.put(labels, make()) if value is None else value

    def put(self, labels, value):
        """Remember `value` for `labels` (emptied first when full); returns `value`."""
        if len(self) >= self.limit:
            self.clear()
        self[labels] = value
        return value


# A table's label sets are told apart in Arrow as "a<US>b<RS>c<US>d" (attributes, concepts): control
# characters no label holds (distinct_label_sets declines a table whose labels do).
_LABEL_SEPARATOR, _LIST_SEPARATOR = "\x1f", "\x1e"


def distinct_label_sets(table: pa.Table):
    """(per row the index of its label set, the distinct label sets as text) of a table of
    annotation rows, found in Arrow: no Python per row. A label set's text ("a<US>b<RS>c<US>d") is
    what callers key their memos by, so a label set met before costs one lookup; label_set_parts
    gives its (attributes, concepts). Null lists are empty ones; labels keep their order. None when
    a label holds a separator character (then the caller goes row by row)."""
    attributes, concepts = table.column("attributes"), table.column("concepts")
    if not all(pa.types.is_list(column.type) and column.type.value_type == pa.string()
               for column in (attributes, concepts)):
        return None  # annotations from elsewhere (large strings, say): Arrow cannot join these
    if _holds_separators(attributes) or _holds_separators(concepts):
        return None
    if not table.num_rows:
        return np.zeros(0, dtype=np.int64), []
    joined = pc.binary_join_element_wise(_joined_labels(attributes), _joined_labels(concepts),
                                         _LIST_SEPARATOR)
    encoded = pc.dictionary_encode(
        joined.combine_chunks() if isinstance(joined, pa.ChunkedArray) else joined)
    return (encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64),
            encoded.dictionary.to_pylist())


def label_set_parts(text: str) -> tuple[list, list]:
    """(attributes, concepts) of a label set's text from distinct_label_sets."""
    labels, more = text.split(_LIST_SEPARATOR)
    return ([a for a in labels.split(_LABEL_SEPARATOR) if a],
            [c for c in more.split(_LABEL_SEPARATOR) if c])


def _joined_labels(column):
    """Each row's labels as one string, in their order ("" for none or null)."""
    return pc.fill_null(pc.binary_join(column, _LABEL_SEPARATOR), "")


def _holds_separators(column) -> bool:
    """Whether a label of this list<string> column holds a separator character.

    Strings are searched in their data buffer at once (a byte search over a few MB, not a
    substring match per label; both separators are ASCII, so no UTF-8 sequence holds their byte).
    The buffer may hold bytes outside a sliced array's labels: such a byte only sends the caller
    row by row, which is correct, just slower.
    """
    values = pc.list_flatten(column)
    separators = np.frombuffer((_LABEL_SEPARATOR + _LIST_SEPARATOR).encode("ascii"), np.uint8)
    for chunk in values.chunks if isinstance(values, pa.ChunkedArray) else [values]:
        data = chunk.buffers()[2] if len(chunk) else None
        if data is not None and np.isin(np.frombuffer(data, np.uint8), separators).any():
            return True
    return False
