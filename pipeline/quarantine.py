"""Quarantine: where bad records go instead of crashing a job, each with its stage and reason.

Every rejected record becomes one JSON line {key, shard, position, stage, reason, detail}.
"""
import json
import re

import apache_beam as beam
from apache_beam.metrics import Metrics

# The tagged output name every balancebeam DoFn uses for rejected records.
QUARANTINE_TAG = "quarantine"
METRICS_NAMESPACE = "balancebeam"

# Stages, in pipeline order.
STAGE_READ = "read"          # opening files, tar framing, table rows, text encoding
STAGE_DECODE = "decode"      # image decoding
STAGE_ANNOTATE = "annotate"  # captions and annotators
STAGE_DEDUPLICATE = "deduplicate"

# Reasons (counters are named quarantined_<reason>).
UNREADABLE_FILE = "unreadable_file"
EMPTY_SHARD = "empty_shard"
TRUNCATED_TAR = "truncated_tar"
CORRUPT_TAR = "corrupt_tar"
UNSAFE_MEMBER_NAME = "unsafe_member_name"
NON_REGULAR_MEMBER = "non_regular_member"
NON_UTF8_TEXT = "non_utf8_text"
BAD_JSON = "bad_json"
BAD_ROW = "bad_row"
MISSING_KEY = "missing_key"
INVALID_KEY = "invalid_key"
MISSING_CAPTION = "missing_caption"
EMPTY_CAPTION = "empty_caption"
MISSING_IMAGE = "missing_image"
UNDECODABLE_IMAGE = "undecodable_image"
IMAGE_TOO_LARGE = "image_too_large"
BAD_EMBEDDING = "bad_embedding"
DUPLICATE_KEY = "duplicate_key"


# "<_io.BytesIO object at 0x7f...>" in an exception's text would make the quarantine file differ
# between two runs of the same job; the address says nothing about the record.
_MEMORY_ADDRESS = re.compile(r"<([\w.]+) object at 0x[0-9a-fA-F]+>")
DETAIL_CHARS = 500


def quarantine_record(stage, reason, key=None, shard=None, position=None, detail=""):
    """A quarantine entry; also bumps the Beam counter quarantined_<reason>."""
    Metrics.counter(METRICS_NAMESPACE, f"quarantined_{reason}").inc()
    Metrics.counter(METRICS_NAMESPACE, "quarantined").inc()
    return {"key": key, "shard": shard, "position": position, "stage": stage, "reason": reason,
            "detail": _MEMORY_ADDRESS.sub(r"<\1>", str(detail))[:DETAIL_CHARS]}


def quarantined(stage, reason, key=None, shard=None, position=None, detail=""):
    """The same entry wrapped for a DoFn's tagged quarantine output."""
    return beam.pvalue.TaggedOutput(
        QUARANTINE_TAG, quarantine_record(stage, reason, key, shard, position, detail))


def sample_quarantined(sample, stage, reason, detail=""):
    return quarantined(stage, reason, sample.get("key"), sample.get("shard"),
                       sample.get("position"), detail)


class WriteQuarantine(beam.PTransform):
    """Writes quarantine entries as JSONL shards `<prefix>-SSSSS-of-NNNNN.jsonl`."""

    def __init__(self, file_path_prefix):
        super().__init__()
        self.file_path_prefix = file_path_prefix

    def expand(self, entries):
        return (
            entries
            | "ToJsonLine" >> beam.Map(lambda e: json.dumps(e, sort_keys=True, ensure_ascii=False))
            | "WriteJsonl" >> beam.io.WriteToText(self.file_path_prefix, file_name_suffix=".jsonl"))
