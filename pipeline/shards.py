"""Writing the release (WriteShards): each input range meets its decisions, kept copies are ranked
and written in shards.

A range is read once, by one worker; a record meets its decision by place (the key is checked).
The decisions come to their range as Arrow files in the job's work folder (pipeline/decide.py).
Kept copies leave as Arrow tables per order bucket (a range of a keyed hash) through files in the
job's work folder (pipeline/file_shuffle.py), so only references to them cross the runner; each
bucket is sorted in Arrow and ranked with exact integer offsets, so shard i holds ranks
[i*S, (i+1)*S). Image bytes are not copied there either: kept tar members travel as their place in
the input tar and are read back by the worker writing the shard.
"""
from __future__ import annotations

import collections
import json
import logging

import apache_beam as beam
import pyarrow.compute as pc
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.typehints import KV, Any, Tuple

from pipeline import release, tars
from pipeline.coders import Batch
from pipeline.counts import COUNTS_TAG, counted
from pipeline.decide import bucket_offsets, read_decisions, route_to_ranges
from pipeline.errors import DataError
from pipeline.file_shuffle import FLUSH_ROWS, GroupTablesByFile, SpillParts
from pipeline.kept_copies import KeptCopies, inline_table, kept_rows
from pipeline.progress import mark_range_read
from pipeline.quarantine import METRICS_NAMESPACE, QUARANTINE_TAG, quarantine_record
from pipeline.keys import safe_keys
from pipeline.splits import PlanRanges, iter_range_records, jsonl_range_bytes, range_lines
from pipeline.table_sources import read_jsonl_table, text_column
from pipeline.worker_tuning import relax_gc

log = logging.getLogger(__name__)

STAGE_RESAMPLE = "resample"
# read now, but annotate wrote no row for it (quarantined there, or new)
NOT_ANNOTATED = "not_annotated"
# the record at this place has another key than when it was annotated
INPUT_CHANGED = "input_changed"
# an annotation row whose record is not in the input read now
MISSING_FROM_INPUT = "missing_from_input"
# Kept copies per ranking bucket (sorted in one worker's memory) and per table a range sends to one
# bucket (bounds a worker's memory while it reads a large file). Members that travel inline (a
# compressed tar's, or any the header index cannot vouch for) bound both by bytes as well.
RANK_BUCKET_SIZE = 100_000
RANK_BUCKET_BYTES = 256 * 1024 * 1024
ITEMS_PER_ELEMENT = 20_000
ELEMENT_BYTES = 64 * 1024 * 1024
BUCKET_SIZES_TAG = "bucket_sizes"


def rank_buckets(copies: int, input_bytes: int) -> int:
    """Ranking buckets for `copies` kept copies read from `input_bytes` of input: at most
    RANK_BUCKET_SIZE copies, and at most RANK_BUCKET_BYTES even if every byte travelled inline."""
    return max(1, -(-copies // RANK_BUCKET_SIZE), -(-input_bytes // RANK_BUCKET_BYTES))


def tar_offsets(path):
    """Header index of an uncompressed input tar (None for anything we cannot seek in)."""
    if not path or CompressionTypes.detect_compression_type(path) != CompressionTypes.UNCOMPRESSED:
        return None
    try:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as raw_file:
            return tars.tar_member_offsets(raw_file)
    except (OSError, ValueError) as error:
        log.warning("cannot index %s (%s): its members travel inline", path, error)
        return None


class ResampleRange(beam.DoFn):
    """((file, range), {"read": [range], "decisions": [references to its decision tables]}) -> its
    kept copies, bucketed for ranking.

    Main output: (order bucket, KEPT_SCHEMA table): the members as released (json with `balance`),
    large ones as their place in the input tar, never image bytes. Tagged outputs: quarantine
    entries, each table's row count, and one count dict per range (records read, kept, dropped,
    quarantined, decisions joined or missing).
    """

    def __init__(self, seed: int, mode: str, buckets: int, key_column: str, caption_column: str,
                 progress_dir=None):
        self.seed, self.mode, self.buckets = seed, mode, buckets
        self.key_column, self.caption_column = key_column, caption_column
        self.progress_dir = progress_dir  # pipeline.progress: a marker per range read

    def setup(self):
        relax_gc()

    def process(self, element):
        file_range, groups = element
        path = file_range[0]
        read_now = list(groups["read"])
        decisions = read_decisions(file_range, list(groups["decisions"]))
        keys, copies_of = decisions["keys"], decisions["copies"]
        index = {position: i for i, position in enumerate(decisions["positions"])}
        if len(index) != len(keys):
            raise DataError(f"annotations list some record of {path} twice (same position); "
                            "re-run annotate into an empty folder")
        if read_now:
            outputs = self._caption_rows(read_now[0], decisions)
            if outputs is not None:
                yield from outputs
                return
        # The loop runs once per record of the input: plain locals, not Counter updates or
        # attribute lookups (a third of this stage's cost beyond the plain loop's was there).
        matched = bytearray(len(keys))
        samples_read = kept = dropped = output_samples = records_quarantined = 0
        quarantined = collections.Counter()
        buckets: dict[int, KeptCopies] = collections.defaultdict(KeptCopies)
        seed, n_buckets, repeat = self.seed, self.buckets, self.mode == "repeat"
        q_of, weight_of = decisions["q"], decisions["weights"]
        locate, released, order_of, copy_key = (tars.locate_members, release.release_members,
                                                release.order_uniform, release.copy_key)
        tagged = beam.pvalue.TaggedOutput
        tar_index = None
        records = iter_range_records(read_now[0], self.key_column,
                                     self.caption_column) if read_now else ()
        for sample in records:
            if isinstance(sample, tagged):  # read-stage quarantine
                entry = sample.value
                quarantined[f"{entry['stage']}:{entry['reason']}"] += 1
                yield sample
                continue
            samples_read += 1
            key = sample["key"]
            i = index.get(sample["position"])
            reason = None
            if i is None or matched[i]:
                reason = NOT_ANNOTATED
                detail = "annotate wrote no row for this record (see its quarantine)"
            elif keys[i] != key:
                reason, detail = INPUT_CHANGED, (
                    f"annotated as key {keys[i]!r}; the input changed since annotate read it")
            if reason is not None:
                quarantined[f"{STAGE_RESAMPLE}:{reason}"] += 1
                records_quarantined += 1
                yield tagged(QUARANTINE_TAG, quarantine_record(
                    STAGE_RESAMPLE, reason, key, path, sample["position"], detail))
                continue
            matched[i] = 1
            copies = copies_of[i]
            if not copies:
                dropped += 1
                continue
            kept += 1
            output_samples += copies
            source = path if sample.get("members") else None
            if source and tar_index is None:
                tar_index = tar_offsets(path) or {}
            for copy in range(copies):
                balance = {"q": q_of[i], "weight": weight_of[i]}
                if repeat:
                    balance["copy"] = copy
                # The released members, json with `balance` included; images as their place in the
                # tar.
                members = locate(key, dict(released(sample, balance)), tar_index)
                order = order_of(seed, key, copy)
                bucket = min(int(order * n_buckets), n_buckets - 1)
                items = buckets[bucket]
                items.add(order, copy_key(key, copy), source, members)
                if len(items) >= ITEMS_PER_ELEMENT or items.inline_bytes >= ELEMENT_BYTES:
                    yield from _send(bucket, buckets.pop(bucket))
        for bucket, items in sorted(buckets.items()):
            yield from _send(bucket, items)
        missing = 0
        kept_signatures = collections.Counter()
        signatures = decisions["signatures"]
        for i, joined in enumerate(matched):
            if joined:
                if copies_of[i]:
                    kept_signatures[signatures[i]] += copies_of[i]
                continue
            missing += 1
            yield tagged(
                QUARANTINE_TAG,
                quarantine_record(
                    STAGE_RESAMPLE, MISSING_FROM_INPUT, keys[i], path,
                    decisions["positions"][i],
                    "annotated, but not in the input read now" if not read_now
                    else "annotated, but no record at this place in the file now"))
        if missing:
            quarantined[f"{STAGE_RESAMPLE}:{MISSING_FROM_INPUT}"] += missing
        counts = {"decisions_grouped": len(keys), "ranges_read": len(read_now)}
        # as a Counter left them: a count that stayed zero is absent
        counts.update((name, value) for name, value in (
            ("samples_read", samples_read), ("decisions_joined", kept + dropped), ("kept", kept),
            ("dropped", dropped), ("output_samples", output_samples),
            ("records_quarantined", records_quarantined), ("missing_from_input", missing)) if value)
        if read_now:
            mark_range_read(self.progress_dir, read_now[0], samples_read)
        yield counted({**counts, "quarantined": dict(quarantined),
                       "kept_signatures": dict(kept_signatures)})

    def _caption_rows(self, file_range, decisions):
        """The outputs of a JSONL range whose every line is annotated, under the same key (as
        process's loop makes them: equal tables, counts and releases), with copies built as columns
        and json.loads only for the kept lines; None for any other range (the loop decides)."""
        first, keys = file_range["first_position"], decisions["keys"]
        if decisions["positions"] != list(range(first, first + len(keys))):
            return None
        read = _caption_range_keys(file_range, self.key_column)
        if read is None or read[1] != keys:
            return None
        lines = read[0]
        copies_of, q_of, weight_of = decisions["copies"], decisions["q"], decisions["weights"]
        signatures, caption_column, repeat = decisions["signatures"], self.caption_column, (
            self.mode == "repeat")
        order_of, release_members = release.order_uniform, release.release_members
        orders, copy_keys, names, data, ends = [], [], [], [], [0]
        kept_signatures = {}
        try:
            for i, copies in enumerate(copies_of):
                if not copies:
                    continue
                key = keys[i]
                # the sample _row_sample makes of this line: the row without its caption is its meta
                meta = json.loads(lines[i].decode("utf-8"))
                caption = meta.pop(caption_column, None)
                if caption is not None and not isinstance(caption, str):
                    caption = str(caption)
                sample = {"key": key, "caption": caption, "meta": meta}
                for copy in range(copies):
                    balance = {"q": q_of[i], "weight": weight_of[i]}
                    if repeat:
                        balance["copy"] = copy
                    for name, member in release_members(sample, balance):
                        names.append(name)
                        data.append(member)
                    ends.append(len(names))
                    orders.append(order_of(self.seed, key, copy))
                    copy_keys.append(release.copy_key(key, copy))
                signature = signatures[i]
                kept_signatures[signature] = kept_signatures.get(signature, 0) + copies
        except Exception:  # a line json.loads refuses: the loop quarantines it
            return None
        outputs = []
        table = inline_table(orders, copy_keys, names, data, ends)
        for bucket, part in _bucket_tables(table, self.buckets):
            outputs.extend(_send_table(bucket, part))
        kept = sum(1 for copies in copies_of if copies)
        counts = {"decisions_grouped": len(keys), "ranges_read": 1}
        counts.update((name, value) for name, value in (
            ("samples_read", len(keys)), ("decisions_joined", len(keys)), ("kept", kept),
            ("dropped", len(keys) - kept), ("output_samples", len(orders))) if value)
        mark_range_read(self.progress_dir, file_range, len(keys))
        outputs.append(counted({**counts, "quarantined": {}, "kept_signatures": kept_signatures}))
        return outputs


def _bucket_tables(table, buckets: int):
    """(bucket, its rows of a KEPT_SCHEMA table) by bucket, rows in table order."""
    import numpy as np

    if not table.num_rows:
        return
    of_row = np.minimum((table.column("order").to_numpy() * buckets).astype(np.int64), buckets - 1)
    order = np.argsort(of_row, kind="stable")
    sorted_buckets = of_row[order]
    starts = np.flatnonzero(np.concatenate(([True], sorted_buckets[1:] != sorted_buckets[:-1])))
    ends = np.append(starts[1:], len(order))
    for start, end in zip(starts.tolist(), ends.tolist()):
        yield int(sorted_buckets[start]), table.take(order[start:end])


def _send_table(bucket, table):
    """A bucket's copies from one range in elements of at most ITEMS_PER_ELEMENT copies and about
    ELEMENT_BYTES."""
    if not table.num_rows:
        return
    rows = max(1, min(ITEMS_PER_ELEMENT, table.num_rows * ELEMENT_BYTES // max(table.nbytes, 1)))
    for start in range(0, table.num_rows, rows):
        part = table.slice(start, rows)
        yield bucket, part
        yield beam.pvalue.TaggedOutput(BUCKET_SIZES_TAG, (bucket, part.num_rows))


def _send(bucket, items: KeptCopies):
    if len(items):
        yield bucket, items.table()
        yield beam.pvalue.TaggedOutput(BUCKET_SIZES_TAG, (bucket, len(items)))


def _caption_range_keys(file_range, key_column):
    """(the range's lines, each line's key as the reader makes it) of a JSONL range whose keys
    pyarrow reads as json.loads would, every line with a key; None for any other range."""
    try:
        data = jsonl_range_bytes(file_range)
    except Exception:  # the loop quarantines an unreadable range
        return None
    table = None if data is None else read_jsonl_table(data, [key_column])
    keys = None if table is None else text_column(table, key_column, allow_integers=True)
    if keys is None or keys.null_count or not pc.all(pc.not_equal(keys, "")).as_py():
        return None
    return range_lines(data), safe_keys(keys).to_pylist()


def sort_and_rank(bucket_and_table, offsets, samples_per_shard):
    """All kept copies of one order bucket (a KEPT_SCHEMA table), sorted by (order, copy key) and
    ranked from the bucket's offset; consecutive ranks go out grouped by the shard that holds them.

    Arrow orders strings by their UTF-8 bytes, which is Python's order of str (by code point).
    """
    bucket, table = bucket_and_table
    table = table.take(pc.sort_indices(table, sort_keys=[("order", "ascending"),
                                                         ("copy_key", "ascending")]))
    first = offsets["offsets"][bucket]
    current, group = None, []
    for i, (_, copy_key, source, members) in enumerate(kept_rows(table)):
        rank = first + i
        shard = rank // samples_per_shard
        if shard != current and group:
            yield current, group
            group = []
        current = shard
        group.append((rank, copy_key, source, members))
    if group:
        yield current, group


class InputTars:
    """Open input files of one shard writer, read at given offsets (each file opened once)."""

    def __init__(self):
        self._open = {}

    def read_at(self, path, offset, size):
        if path not in self._open:
            self._open[path] = FileSystems.open(path,
                                                compression_type=CompressionTypes.UNCOMPRESSED)
        handle = self._open[path]
        handle.seek(offset)
        return handle.read(size)

    def close(self):
        for handle in self._open.values():
            handle.close()
        self._open.clear()


def write_ranked_shard(output_dir: str, prefix: str, index: int, ordered) -> dict:
    """Shard `index` from its copies in rank order [(rank, key, source tar, members)]: its manifest
    entry.

    Large members are read here from the input tars, once, at the place ResampleRange noted.
    """
    path = FileSystems.join(output_dir, tars.shard_name(prefix, index))
    inputs = InputTars()

    def released(rank_key_source_members):
        _, key, source, located = rank_key_source_members
        members = tars.read_members(located,
                                    lambda offset, size: inputs.read_at(source, offset, size),
                                    where=f"{source} ({key})")
        return key, list(members.items())

    try:
        info = tars.write_shard(path, map(released, ordered))
    finally:
        inputs.close()
    return dict(info, index=index, first_rank=ordered[0][0] if ordered else None)


PARTIAL_SHARDS_TAG = "partial"


class WriteWholeShards(beam.DoFn):
    """(shard index, its copies from one order bucket) -> the shard written here when the bucket
    holds all of it (most shards: a bucket holds many), else the piece, tagged, for WriteShard to
    join.

    So only the copies of the shards that straddle two buckets cross a second shuffle.
    """

    def __init__(self, output_dir: str, prefix: str, samples_per_shard: int):
        self.output_dir, self.prefix, self.samples_per_shard = output_dir, prefix, samples_per_shard
        self.shards = Metrics.counter(METRICS_NAMESPACE, "shards_written")

    def process(self, shard_and_group, offsets):
        index, group = shard_and_group
        whole = min(self.samples_per_shard, offsets["total"] - index * self.samples_per_shard)
        if len(group) != whole:
            yield beam.pvalue.TaggedOutput(PARTIAL_SHARDS_TAG, shard_and_group)
            return
        self.shards.inc()
        yield write_ranked_shard(self.output_dir, self.prefix, index, group)


class WriteShard(beam.DoFn):
    """(shard index, [[(rank, key, source tar, members)]]) -> one tar in rank order; yields its
    manifest entry."""

    def __init__(self, output_dir: str, prefix: str):
        self.output_dir, self.prefix = output_dir, prefix
        self.shards = Metrics.counter(METRICS_NAMESPACE, "shards_written")

    def process(self, shard):
        index, groups = shard
        ordered = sorted((item for group in groups for item in group), key=lambda item: item[0])
        self.shards.inc()
        yield write_ranked_shard(self.output_dir, self.prefix, index, ordered)


class WriteShards(beam.PTransform):
    """Decision batches -> the kept copies, read from the input once, ranked and written as shards.

    Each input range meets the decisions of its records (one CoGroupByKey of the range with the
    references to its decision tables, spilled as Arrow files in `work_dir`) and sends its kept
    copies to their order bucket, as Arrow files there too; a bucket writes the shards it holds
    whole, and only the pieces of shards that straddle two buckets cross the runner's shuffle.
    Returns {"shards": each shard's manifest entry, "counts": count dicts, "quarantine": entries}.
    """

    def __init__(self, input_glob, input_format, seed, mode, buckets, output_dir, work_dir, prefix,
                 samples_per_shard, key_column="key", caption_column="caption", progress_dir=None):
        super().__init__()
        self.work_dir = work_dir
        self.input_glob, self.input_format = input_glob, input_format
        self.seed, self.mode, self.buckets = seed, mode, buckets
        self.output_dir, self.prefix, self.samples_per_shard = output_dir, prefix, samples_per_shard
        self.key_column, self.caption_column = key_column, caption_column
        self.progress_dir = progress_dir

    def expand(self, decisions):
        ranges = decisions.pipeline | "PlanRanges" >> PlanRanges(self.input_glob, self.input_format)
        range_starts = (ranges
                        | "RangeStart" >> beam.Map(lambda r: (r["path"], r["first_position"]))
                        | "RangesOfFile" >> beam.GroupByKey()
                        |
                        "SortStarts" >> beam.MapTuple(lambda path, starts: (path, sorted(starts))))
        routed = (decisions
                  | "RouteToRanges" >> beam.FlatMap(
                      route_to_ranges, beam.pvalue.AsDict(range_starts)).with_output_types(
                          KV[Tuple[str, int], Batch])
                  | "SpillDecisions" >> beam.ParDo(SpillParts(self.work_dir, FLUSH_ROWS)))
        per_range = (
            {
                "read": ranges | "ByRange" >> beam.Map(lambda r: ((r["path"], r["index"]), r)),
                "decisions": routed
            }
            | "ByInputRange" >> beam.CoGroupByKey()
            | "ResampleRange" >> beam.ParDo(
                ResampleRange(self.seed, self.mode, self.buckets, self.key_column,
                              self.caption_column, self.progress_dir)).with_output_types(
                                  KV[int, Batch]).with_outputs(
                                      QUARANTINE_TAG, COUNTS_TAG, BUCKET_SIZES_TAG, main="kept"))
        offsets = (per_range[BUCKET_SIZES_TAG]
                   | "BucketSizes" >> beam.CombinePerKey(sum)
                   | "AllSizes" >> beam.combiners.ToList()
                   | "Offsets" >> beam.Map(bucket_offsets))
        ranked = (
            per_range.kept
            | "GroupOrderBucket" >> GroupTablesByFile(self.work_dir)
            | "SortAndRank" >> beam.FlatMap(sort_and_rank, beam.pvalue.AsSingleton(offsets),
                                            self.samples_per_shard).with_output_types(
                                                KV[int, Batch])
            | "WriteWholeShards" >> beam.ParDo(
                WriteWholeShards(self.output_dir, self.prefix, self.samples_per_shard),
                beam.pvalue.AsSingleton(offsets)).with_output_types(
                    Any, **{PARTIAL_SHARDS_TAG: KV[int, Batch]}).with_outputs(
                        PARTIAL_SHARDS_TAG, main="written"))
        joined = (ranked[PARTIAL_SHARDS_TAG]
                  | "GroupByShard" >> beam.GroupByKey()
                  | "WriteShard" >> beam.ParDo(WriteShard(self.output_dir, self.prefix)))
        shards = (ranked.written, joined) | "ShardLists" >> beam.Flatten()
        return {
            "shards": shards, "counts": per_range[COUNTS_TAG],
            "quarantine": per_range[QUARANTINE_TAG]
        }
