"""Record layouts shared by the Beam jobs: the annotations Parquet schema and its row builder.

Downstream jobs (balance, resample, report) read annotations through this schema.
"""
import pyarrow as pa

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
