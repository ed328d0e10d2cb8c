"""The resample job: apply a solution to every record and write the balanced WebDataset release.

Annotation rows become keep decisions in batches, grouped by the input file they describe; each
input file is read once, on one worker, and its records meet their decisions by position (the key
is checked). Kept copies are ranked along a keyed-hash order and written in shards. Every element
that crosses a shuffle is a batch (a file's decisions, a bucket of kept copies), never one record,
and image bytes never cross one at all: kept tar members travel as their place in the input tar.
The job reconciles its own counts and publishes a manifest only when every record is accounted for.
"""
from __future__ import annotations

import argparse
import bisect
import collections
import heapq
import json
import logging
import sys
import uuid
import zlib

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from pipeline import hashing, release
from pipeline.annotate import ANNOTATIONS_GLOB, annotation_rows, read_counts
from pipeline.files import count_lines, delete_matching, ensure_writable_directory, read_text, write_text_atomically
from pipeline.counts import add_counts
from pipeline.errors import DataError, ReconciliationError, UsageError
from pipeline.options import pipeline_options
from pipeline.quarantine import QUARANTINE_TAG, STAGE_READ, WriteQuarantine, quarantine_record
from pipeline.sources import FORMATS, normalize_path
from pipeline.splits import PlanRanges, iter_range_records
from solvers.solution import BalanceSolution

log = logging.getLogger(__name__)

METRICS_NAMESPACE = "balancebeam"
MANIFEST_FILE = "manifest.json"
SIZES_FILE = "sizes.json"
KEPT_SIGNATURES_FILE = "kept-signatures.jsonl"
# What a published release holds besides its shards; removed before a new release is written into
# the same folder, so a crash can never leave an old manifest, card or report beside new shards.
REPORT_FILES = ("stats.json", "report.html", "README.md")
STAGE_RESAMPLE = "resample"
NOT_ANNOTATED = "not_annotated"  # read now, but annotate wrote no row for it (quarantined there, or new)
INPUT_CHANGED = "input_changed"  # the record at this place has another key than when it was annotated
MISSING_FROM_INPUT = "missing_from_input"  # an annotation row whose record is not in the input read now
# Kept copies per ranking bucket (sorted in one worker's memory) and per element a file sends to
# one bucket (bounds a worker's memory while it reads a large file).
RANK_BUCKET_SIZE = 100_000
ITEMS_PER_ELEMENT = 20_000
_ANNOTATION_COLUMNS = ["key", "shard", "position", "attributes", "concepts", "utility"]
_COUNTS_TAG = "counts"
# Ranked signatures are merged in this many groups to find each one's exact-count threshold.
THRESHOLD_BUCKETS = 64
_BUCKET_SIZES_TAG = "bucket_sizes"
_WORK_DIR_PREFIX = ".resample-work-"


def _counts_output(counts: dict):
    return beam.pvalue.TaggedOutput(_COUNTS_TAG, counts)


# --- decisions ----------------------------------------------------------------------------------

class _SolutionUser(beam.DoFn):
    """A DoFn that reads the solution from its side input once per worker."""

    def __init__(self, seed: int, mode: str):
        self.seed, self.mode = seed, mode
        self._rule, self._text = None, None
        self._paths: dict[str, str] = {}

    def rule(self, solution_text: str) -> release.KeepRule:
        if self._rule is None or not (self._text is solution_text or self._text == solution_text):
            self._rule = release.KeepRule(BalanceSolution.from_json(solution_text), self.seed, self.mode)
            self._text = solution_text
        return self._rule


def _empty_batch() -> dict:
    return {"positions": [], "keys": [], "q": [], "weights": [], "copies": [], "signatures": []}


class Decide(_SolutionUser):
    """A table of annotation rows -> (input file, batch of decisions): q, copies, weight, signature.

    copies is None in repeat mode (decided later along the global order, see RepeatCopies).
    """

    def _path(self, shard: str) -> str:
        """The input file as resample names it (annotations from before paths were absolute)."""
        if shard not in self._paths:
            self._paths[shard] = normalize_path(shard)
        return self._paths[shard]

    def process(self, table, solution_text, thresholds):
        rule = self.rule(solution_text)
        columns = table.to_pydict()
        batches: dict[str, dict] = {}
        decided = rule.signatures_and_probabilities(zip(columns["attributes"], columns["concepts"],
                                                        columns["utility"]))
        for key, shard, position, (signature, q) in zip(columns["key"], columns["shard"], columns["position"],
                                                       decided):
            shard = self._path(shard)
            batch = batches.get(shard)
            if batch is None:
                batch = batches[shard] = _empty_batch()
            batch["positions"].append(position)
            batch["keys"].append(key)
            batch["q"].append(q)
            batch["weights"].append(rule.weight(q))
            batch["copies"].append(None if self.mode == "repeat" else
                                   rule.copies(key, q, signature, thresholds.get(signature)))
            batch["signatures"].append(signature)
        yield from batches.items()
        yield _counts_output({"decisions_read": table.num_rows})


class RankCandidates(_SolutionUser):
    """Exact mode: a table of annotation rows -> per ranked signature in it, the (draw, key) of its
    k_s smallest rows (sorted), keyed by a bucket of signatures for the merge."""

    def process(self, table, solution_text):
        rule = self.rule(solution_text)
        columns = table.to_pydict()
        decided = rule.signatures_and_probabilities(zip(columns["attributes"], columns["concepts"],
                                                        columns["utility"]))
        draws = collections.defaultdict(list)
        for key, (signature, _) in zip(columns["key"], decided):
            if rule.exact_signature(signature) is not None:
                draws[signature].append((hashing.keyed_uniform(self.seed, key), key))
        for signature, found in draws.items():
            keep = rule.exact_signature(signature)[1]
            yield _signature_bucket(signature), (signature, keep, heapq.nsmallest(keep, found))


def _signature_bucket(signature: str) -> int:
    return zlib.crc32(signature.encode("utf-8")) % THRESHOLD_BUCKETS


def _thresholds(bucket_and_parts):
    """The k_s-th smallest (draw, key) of each signature: rows at or below it are the k_s kept."""
    _, parts = bucket_and_parts
    merged, keep = collections.defaultdict(list), {}
    for signature, count, smallest in parts:
        merged[signature].extend(smallest)
        keep[signature] = count
    for signature, found in merged.items():
        yield signature, heapq.nsmallest(keep[signature], found)[-1]


class ExactThresholds(beam.PTransform):
    """Annotation tables -> {signature: threshold} for exact mode ({} in the other modes)."""

    def __init__(self, seed: int, mode: str, solution):
        super().__init__()
        self.seed, self.mode, self.solution = seed, mode, solution

    def expand(self, tables):
        if self.mode != "exact":
            return tables.pipeline | "NoThresholds" >> beam.Create([{}])
        return (tables
                | "RankCandidates" >> beam.ParDo(RankCandidates(self.seed, self.mode),
                                                 beam.pvalue.AsSingleton(self.solution))
                | "BySignatureBucket" >> beam.GroupByKey()
                | "Thresholds" >> beam.FlatMap(_thresholds)
                | "AsDict" >> beam.combiners.ToDict())


def _route_to_ranges(shard_and_batch, range_starts):
    """(input file, batch) -> ((file, range index), part) for each range of the file the batch touches.

    range_starts: file -> sorted positions its ranges start at; a file not read now is range 0.
    """
    shard, batch = shard_and_batch
    starts = range_starts.get(shard)
    if not starts or len(starts) == 1:
        yield (shard, 0), batch
        return
    rows = collections.defaultdict(list)
    for i, position in enumerate(batch["positions"]):
        rows[bisect.bisect_right(starts, position) - 1].append(i)
    for index, indices in sorted(rows.items()):
        yield (shard, max(index, 0)), _split_batch(batch, indices)


def _merge_batches(batches) -> dict:
    merged = _empty_batch()
    for batch in batches:
        for name, values in batch.items():
            merged[name].extend(values)
    return merged


def _split_batch(batch: dict, rows) -> dict:
    return {name: [values[i] for i in rows] for name, values in batch.items()}


class RepeatCopies(beam.PTransform):
    """Repeat mode: copies proportional to q, exactly `output_size` in all (systematic sampling).

    Decision batches are re-bucketed by a keyed-hash order, sorted per bucket, given exact integer
    running sums of their masses (bucket offsets from a side input), and sent back by input file.
    """

    def __init__(self, seed: int, output_size: int | None, buckets: int):
        super().__init__()
        self.seed, self.output_size, self.buckets = seed, output_size, buckets

    def expand(self, decisions):
        seed, buckets = self.seed, self.buckets

        def by_order_bucket(shard_and_batch):
            shard, batch = shard_and_batch
            rows = collections.defaultdict(list)
            orders = [hashing.keyed_uniform(seed, key, hashing.REPEAT) for key in batch["keys"]]
            for i, order in enumerate(orders):
                rows[min(int(order * buckets), buckets - 1)].append(i)
            for bucket, indices in rows.items():
                part = _split_batch(batch, indices)
                part["order"] = [orders[i] for i in indices]
                part["shard"] = [shard] * len(indices)
                yield bucket, part

        def sort_bucket(bucket_and_parts):
            bucket, parts = bucket_and_parts
            rows = [row for part in parts for row in zip(
                part["order"], part["keys"], part["shard"], part["positions"], part["q"], part["weights"],
                part["signatures"])]
            rows.sort(key=lambda row: (row[0], row[1]))
            starts, running = [], 0
            for row in rows:
                starts.append(running)
                running += release.repeat_mass(row[4])
            yield bucket, (rows, starts)
            yield beam.pvalue.TaggedOutput("totals", (bucket, running))

        sorted_buckets = (decisions
                          | "ByOrderBucket" >> beam.FlatMap(by_order_bucket)
                          | "GroupOrderBucket" >> beam.GroupByKey()
                          | "SortBucket" >> beam.FlatMap(sort_bucket).with_outputs("totals", main="rows"))
        offsets = (sorted_buckets.totals
                   | "AllTotals" >> beam.combiners.ToList()
                   | "Offsets" >> beam.Map(_bucket_offsets))
        size = (decisions
                | "RowsPerBatch" >> beam.MapTuple(lambda _, batch: len(batch["keys"]))
                | "DefaultSize" >> beam.CombineGlobally(sum))
        requested = self.output_size
        offset_uniform = hashing.keyed_uniform(seed, "systematic-offset", hashing.REPEAT)

        def with_copies(bucket_and_rows, offsets, size):
            bucket, (rows, starts) = bucket_and_rows
            target = size if requested is None else requested
            total, base = offsets["total"], offsets["offsets"][bucket]
            batches: dict[str, dict] = {}
            for (_, key, shard, position, q, weight, signature), start in zip(rows, starts):
                start += base
                end = start + release.repeat_mass(q)
                batch = batches.get(shard)
                if batch is None:
                    batch = batches[shard] = _empty_batch()
                batch["positions"].append(position)
                batch["keys"].append(key)
                batch["q"].append(q)
                batch["weights"].append(weight)
                batch["copies"].append(release.repeat_copies(start, end, total, target, offset_uniform))
                batch["signatures"].append(signature)
            yield from batches.items()

        return sorted_buckets.rows | "Copies" >> beam.FlatMap(
            with_copies, beam.pvalue.AsSingleton(offsets), beam.pvalue.AsSingleton(size))


def _bucket_offsets(totals) -> dict:
    offsets, running = {}, 0
    for bucket, total in sorted(totals):
        offsets[bucket] = running
        running += total
    return {"offsets": offsets, "total": running}


# --- one input range meets its decisions --------------------------------------------------------

def _tar_offsets(path):
    """Header index of an uncompressed input tar (None for anything we cannot seek in)."""
    if not path or CompressionTypes.detect_compression_type(path) != CompressionTypes.UNCOMPRESSED:
        return None
    try:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as raw_file:
            return release.tar_member_offsets(raw_file)
    except (OSError, ValueError) as error:
        log.warning("cannot index %s (%s): its members travel inline", path, error)
        return None


class ResampleRange(beam.DoFn):
    """((file, range), {"read": [range], "decisions": [batches]}) -> its kept copies, bucketed for ranking.

    Main output: (order bucket, [(order, copy key, source tar, members)]): the members as released
    (json with `balance`), large ones as their place in the input tar, never image bytes. Tagged
    outputs: quarantine entries, each bucket element's size, and one count dict per range (records
    read, kept, dropped, quarantined, decisions joined or missing).
    """

    def __init__(self, seed: int, mode: str, buckets: int, key_column: str, caption_column: str):
        self.seed, self.mode, self.buckets = seed, mode, buckets
        self.key_column, self.caption_column = key_column, caption_column
        self.kept_counter = Metrics.counter(METRICS_NAMESPACE, "records_kept")
        self.read_counter = Metrics.counter(METRICS_NAMESPACE, "records_read")

    def process(self, element):
        (path, _), groups = element
        read_now = list(groups["read"])
        decisions = _merge_batches(groups["decisions"])
        counts = collections.Counter()
        quarantined = collections.Counter()
        kept_signatures = collections.Counter()
        counts["decisions_grouped"] = len(decisions["keys"])
        index = {position: i for i, position in enumerate(decisions["positions"])}
        if len(index) != len(decisions["keys"]):
            raise DataError(f"annotations list some record of {path} twice (same position); "
                            "re-run annotate into an empty folder")
        matched = bytearray(len(decisions["keys"]))
        buckets: dict[int, list] = collections.defaultdict(list)
        tar_index = None
        if read_now:
            for output in iter_range_records(read_now[0], self.key_column, self.caption_column):
                if isinstance(output, beam.pvalue.TaggedOutput):  # read-stage quarantine
                    entry = output.value
                    quarantined[f"{entry['stage']}:{entry['reason']}"] += 1
                    yield output
                    continue
                sample = output
                counts["samples_read"] += 1
                i = index.get(sample["position"])
                reason = None
                if i is None or matched[i]:
                    reason, detail = NOT_ANNOTATED, "annotate wrote no row for this record (see its quarantine)"
                elif decisions["keys"][i] != sample["key"]:
                    reason, detail = INPUT_CHANGED, (f"annotated as key {decisions['keys'][i]!r}; the input "
                                                     "changed since annotate read it")
                if reason is not None:
                    quarantined[f"{STAGE_RESAMPLE}:{reason}"] += 1
                    counts["records_quarantined"] += 1
                    yield beam.pvalue.TaggedOutput(QUARANTINE_TAG, quarantine_record(
                        STAGE_RESAMPLE, reason, sample["key"], path, sample["position"], detail))
                    continue
                matched[i] = 1
                counts["decisions_joined"] += 1
                copies = decisions["copies"][i]
                if not copies:
                    counts["dropped"] += 1
                    continue
                counts["kept"] += 1
                counts["output_samples"] += copies
                kept_signatures[decisions["signatures"][i]] += copies
                source = path if sample.get("members") else None
                if source and tar_index is None:
                    tar_index = _tar_offsets(path) or {}
                for copy in range(copies):
                    balance = {"q": decisions["q"][i], "weight": decisions["weights"][i]}
                    if self.mode == "repeat":
                        balance["copy"] = copy
                    # The released members, json with `balance` included; images as their place in the tar.
                    members = release.locate_members(sample["key"], dict(release.release_members(sample, balance)),
                                                     tar_index)
                    order = release.order_uniform(self.seed, sample["key"], copy)
                    bucket = min(int(order * self.buckets), self.buckets - 1)
                    items = buckets[bucket]
                    items.append((order, release.copy_key(sample["key"], copy), source, members))
                    if len(items) >= ITEMS_PER_ELEMENT:
                        yield bucket, items
                        yield beam.pvalue.TaggedOutput(_BUCKET_SIZES_TAG, (bucket, len(items)))
                        buckets[bucket] = []
        for bucket, items in sorted(buckets.items()):
            if items:
                yield bucket, items
                yield beam.pvalue.TaggedOutput(_BUCKET_SIZES_TAG, (bucket, len(items)))
        for i in range(len(matched)):
            if not matched[i]:
                counts["missing_from_input"] += 1
                quarantined[f"{STAGE_RESAMPLE}:{MISSING_FROM_INPUT}"] += 1
                yield beam.pvalue.TaggedOutput(QUARANTINE_TAG, quarantine_record(
                    STAGE_RESAMPLE, MISSING_FROM_INPUT, decisions["keys"][i], path, decisions["positions"][i],
                    "annotated, but not in the input read now" if not read_now
                    else "annotated, but no record at this place in the file now"))
        self.read_counter.inc(counts["samples_read"])
        self.kept_counter.inc(counts["kept"])
        counts["ranges_read"] = len(read_now)
        yield _counts_output({**counts, "quarantined": dict(quarantined),
                              "kept_signatures": dict(kept_signatures)})


# --- ranking and writing ------------------------------------------------------------------------

def _sort_bucket(bucket_and_chunks, offsets, samples_per_shard):
    """All kept copies of one order bucket, sorted by (order, copy key) and ranked from the bucket's
    offset; consecutive ranks go out grouped by the shard that holds them."""
    bucket, chunks = bucket_and_chunks
    items = sorted((item for chunk in chunks for item in chunk), key=lambda item: (item[0], item[1]))
    first = offsets["offsets"][bucket]
    current, group = None, []
    for i, (_, copy_key, source, members) in enumerate(items):
        rank = first + i
        shard = rank // samples_per_shard
        if shard != current and group:
            yield current, group
            group = []
        current = shard
        group.append((rank, copy_key, source, members))
    if group:
        yield current, group


class _InputTars:
    """Open input files of one shard writer, read at given offsets (each file opened once)."""

    def __init__(self):
        self._open = {}

    def read_at(self, path, offset, size):
        if path not in self._open:
            self._open[path] = FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)
        handle = self._open[path]
        handle.seek(offset)
        return handle.read(size)

    def close(self):
        for handle in self._open.values():
            handle.close()
        self._open.clear()


class WriteShard(beam.DoFn):
    """(shard index, [[(rank, key, source tar, members)]]) -> one tar in rank order; yields its manifest entry.

    Large members are read here from the input tars, once, at the place ResampleRange noted.
    """

    def __init__(self, output_dir: str, prefix: str):
        self.output_dir, self.prefix = output_dir, prefix
        self.shards = Metrics.counter(METRICS_NAMESPACE, "shards_written")

    def process(self, shard):
        index, groups = shard
        ordered = sorted((item for group in groups for item in group), key=lambda item: item[0])
        path = FileSystems.join(self.output_dir, release.shard_name(self.prefix, index))
        inputs = _InputTars()

        def released(rank_key_source_members):
            _, key, source, located = rank_key_source_members
            members = release.read_members(located, lambda offset, size: inputs.read_at(source, offset, size),
                                           where=f"{source} ({key})")
            return key, list(members.items())

        try:
            info = release.write_shard(path, map(released, ordered))
        finally:
            inputs.close()
        self.shards.inc()
        yield dict(info, index=index, first_rank=ordered[0][0] if ordered else None)


def _write_json(path: str, payload) -> None:
    write_text_atomically(path, json.dumps(payload, sort_keys=True))


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
            _COUNTS_TAG, main="decisions")
    decisions = decided.decisions
    if mode == "repeat":
        decisions = decisions | "RepeatCopies" >> RepeatCopies(seed, output_size, buckets)
    ranges = pipeline | "PlanRanges" >> PlanRanges(input_glob, input_format)
    range_starts = (ranges
                    | "RangeStart" >> beam.Map(lambda r: (r["path"], r["first_position"]))
                    | "RangesOfFile" >> beam.GroupByKey()
                    | "SortStarts" >> beam.MapTuple(lambda path, starts: (path, sorted(starts))))
    routed = decisions | "RouteToRanges" >> beam.FlatMap(_route_to_ranges, beam.pvalue.AsDict(range_starts))
    per_file = ({"read": ranges | "ByRange" >> beam.Map(lambda r: ((r["path"], r["index"]), r)), "decisions": routed}
                | "ByInputRange" >> beam.CoGroupByKey()
                | "ResampleRange" >> beam.ParDo(ResampleRange(
                    seed, mode, buckets, key_column, caption_column)).with_outputs(
                        QUARANTINE_TAG, _COUNTS_TAG, _BUCKET_SIZES_TAG, main="kept"))
    offsets = (per_file[_BUCKET_SIZES_TAG]
               | "BucketSizes" >> beam.CombinePerKey(sum)
               | "AllSizes" >> beam.combiners.ToList()
               | "Offsets" >> beam.Map(_bucket_offsets))
    _ = (per_file.kept
         | "GroupOrderBucket" >> beam.GroupByKey()
         | "SortAndRank" >> beam.FlatMap(_sort_bucket, beam.pvalue.AsSingleton(offsets), samples_per_shard)
         | "GroupByShard" >> beam.GroupByKey()
         | "WriteShard" >> beam.ParDo(WriteShard(output_dir, prefix))
         | "AllShards" >> beam.combiners.ToList()
         | "WriteShardList" >> beam.Map(_write_json_to, FileSystems.join(work_dir, "shards.json")))
    _ = ((decided[_COUNTS_TAG], per_file[_COUNTS_TAG])
         | "AllCounts" >> beam.Flatten()
         | "AddCounts" >> beam.CombineGlobally(add_counts)
         | "WriteCounts" >> beam.Map(_write_json_to, FileSystems.join(work_dir, "counts.json")))
    if quarantine_prefix:
        _ = per_file[QUARANTINE_TAG] | "WriteQuarantine" >> WriteQuarantine(quarantine_prefix)


def _write_json_to(payload, path):
    _write_json(path, payload)
    return path


# --- the driver: prepare, run, reconcile, publish -----------------------------------------------

def reconcile(counts: dict, shards: list[dict], annotation_rows_written: int, quarantine_lines: int,
              samples_per_shard: int, exact_counts: dict | None = None) -> dict:
    """The job's own accounting; raises ReconciliationError naming every equation that fails."""
    read_quarantined = sum(n for reason, n in counts.get("quarantined", {}).items()
                           if reason.startswith(STAGE_READ + ":"))
    numbers = {
        "annotation_rows_written": annotation_rows_written,
        "decisions_read": counts.get("decisions_read", 0),
        "decisions_grouped_by_range": counts.get("decisions_grouped", 0),
        "decisions_joined": counts.get("decisions_joined", 0),
        "missing_from_input": counts.get("missing_from_input", 0),
        "samples_read": counts.get("samples_read", 0),
        "kept": counts.get("kept", 0),
        "dropped": counts.get("dropped", 0),
        "records_quarantined": counts.get("records_quarantined", 0),
        "read_quarantined": read_quarantined,
        "quarantined_total": sum(counts.get("quarantined", {}).values()),
        "quarantine_lines_written": quarantine_lines,
        "output_samples": counts.get("output_samples", 0),
        "kept_signature_copies": sum(counts.get("kept_signatures", {}).values()),
        "samples_in_shards": sum(shard["samples"] for shard in shards),
        "shards_written": len(shards),
    }
    n = numbers
    expected_shards = -(-n["output_samples"] // samples_per_shard)
    indices = sorted(shard["index"] for shard in shards)
    checks = [
        ("annotation rows read = annotation rows annotate wrote",
         n["decisions_read"], n["annotation_rows_written"]),
        ("annotation rows grouped by input range = annotation rows read",
         n["decisions_grouped_by_range"], n["decisions_read"]),
        ("annotation rows joined + missing from the input = annotation rows read",
         n["decisions_joined"] + n["missing_from_input"], n["decisions_read"]),
        ("kept + dropped = annotation rows joined", n["kept"] + n["dropped"], n["decisions_joined"]),
        ("kept + dropped + quarantined at resample = records read",
         n["kept"] + n["dropped"] + n["records_quarantined"], n["samples_read"]),
        ("samples written in shards = output samples", n["samples_in_shards"], n["output_samples"]),
        ("kept copies by signature = output samples", n["kept_signature_copies"], n["output_samples"]),
        ("quarantine lines written = records quarantined", n["quarantine_lines_written"], n["quarantined_total"]),
        ("shards written = ceil(output samples / samples per shard)", n["shards_written"], expected_shards),
    ]
    failed = [f"{name}: {left} != {right}" for name, left, right in checks if left != right]
    if indices != list(range(len(shards))):
        failed.append(f"shard indices are not 0..{len(shards) - 1} each once: {indices[:10]}...")
    short = [s["name"] for s in shards if s["samples"] != samples_per_shard and s["index"] != len(shards) - 1]
    if short:
        failed.append(f"shards other than the last are not full: {short[:5]}")
    if exact_counts and not n["missing_from_input"]:
        kept = counts.get("kept_signatures", {})
        off = [(signature, kept.get(signature, 0), entry[1]) for signature, entry in sorted(exact_counts.items())
               if entry[2] and kept.get(signature, 0) != entry[1]]
        numbers["signatures_off_their_exact_count"] = len(off)
        if off:
            failed.append(f"{len(off)} signatures kept other than their exact count (signature, kept, asked): "
                          f"{off[:3]}")
    if failed:
        raise ReconciliationError(
            "resample did not account for every record, so no manifest was published (the shards "
            "written are not a release; re-run the job): " + "; ".join(failed) + ". All counts: "
            + ", ".join(f"{name} {value}" for name, value in numbers.items()), numbers)
    return numbers


def prepare_release_dir(output_dir: str) -> None:
    """Make the folder writable for a release and unpublish whatever release it held.

    The manifest goes first (and the report, card and lists that describe the old shards), so
    from here until the new manifest is written the folder is visibly not a release.
    """
    try:
        ensure_writable_directory(output_dir)
    except ValueError as error:
        raise UsageError(str(error)) from None
    manifest = FileSystems.join(output_dir, MANIFEST_FILE)
    if FileSystems.exists(manifest):
        log.info("unpublishing the release in %s before writing the new one", output_dir)
        FileSystems.delete([manifest])
        for name in (SIZES_FILE, KEPT_SIGNATURES_FILE, *REPORT_FILES):
            if FileSystems.exists(FileSystems.join(output_dir, name)):
                FileSystems.delete([FileSystems.join(output_dir, name)])


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
    manifest = _manifest(counts, numbers, shard_entries, {
        "format": "webdataset", "prefix": prefix, "samples_per_shard": samples_per_shard, "mode": mode,
        "seed": seed, "output_size": output_size, "input": input_glob,
        "solution_digest": release.solution_digest(solution), "solution_status": solution.status,
        "certificate": solution.certificate()})
    write_text_atomically(FileSystems.join(output_dir, SIZES_FILE),
                          json.dumps({s["name"]: s["samples"] for s in shard_entries}, indent=1) + "\n")
    _write_kept_signatures(counts.get("kept_signatures", {}), output_dir)
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


def _manifest(counts: dict, numbers: dict, shards: list[dict], details: dict) -> dict:
    quarantined = dict(sorted(counts.get("quarantined", {}).items()))
    summary = {name: numbers[name] for name in (
        "samples_read", "kept", "dropped", "output_samples", "records_quarantined", "missing_from_input",
        "decisions_read", "decisions_joined", "quarantined_total")}
    summary["quarantined"] = quarantined
    summary["input_records"] = numbers["samples_read"] + numbers["read_quarantined"]
    return {**details, "shards": shards, "counts": summary, "total_bytes": sum(s["bytes"] for s in shards)}


def _write_kept_signatures(counts: dict, output_dir: str) -> None:
    lines = [json.dumps({"signature": json.loads(s), "count": n}) for s, n in sorted(counts.items())]
    write_text_atomically(FileSystems.join(output_dir, KEPT_SIGNATURES_FILE), "".join(line + "\n" for line in lines))


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
