"""Keep decisions in batches: per annotation row its q and copies, grouped by the input range it
describes.

The solution travels as a side input; exact mode first ranks each constrained signature's rows by
their keyed hash (ExactThresholds), repeat mode spreads copies along a keyed-hash order
(RepeatCopies). A batch is a dict of equal-length lists: positions, keys, q, weights, copies,
signatures; it goes to the input ranges it describes as Arrow tables (DECISION_SCHEMA) through
files.
"""
from __future__ import annotations

import collections
import heapq
import math

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.typehints import KV

from pipeline import hashing, release
from pipeline.coders import Batch
from pipeline.counts import counted
from pipeline.errors import DataError
from pipeline.file_shuffle import parts_by_bucket, read_bucket
from pipeline.inputs import normalize_path
from pipeline.worker_tuning import relax_gc
from solvers.solution import BalanceSolution

class _SolutionUser(beam.DoFn):
    """A DoFn that reads the solution from its side input once per worker."""

    def __init__(self, seed: int, mode: str):
        self.seed, self.mode = seed, mode
        self._rule, self._text = None, None
        self._paths: dict[str, str] = {}

    def setup(self):
        relax_gc()

    def rule(self, solution_text: str) -> release.KeepRule:
        if self._rule is None or not (self._text is solution_text or self._text == solution_text):
            self._rule = release.KeepRule(BalanceSolution.from_json(solution_text), self.seed,
                                          self.mode)
            self._text = solution_text
        return self._rule


def _empty_batch() -> dict:
    return {"positions": [], "keys": [], "q": [], "weights": [], "copies": [], "signatures": []}


def _add_decision(batches: dict, shard: str, position, key, q, weight, copies, signature) -> None:
    """Append one row's decision to the batch of its input file."""
    batch = batches.get(shard)
    if batch is None:
        batch = batches[shard] = _empty_batch()
    for name, value in (("positions", position), ("keys", key), ("q", q), ("weights", weight),
                        ("copies", copies), ("signatures", signature)):
        batch[name].append(value)


class Decide(_SolutionUser):
    """A table of annotation rows -> (input file, batch of decisions): q, copies, weight, signature.

    copies is None in repeat mode (decided later along the global order, see RepeatCopies). Only the
    rows whose copies hang on their keyed draw are hashed, one at a time; the rest is per signature.
    """

    def _path(self, shard: str) -> str:
        """The input file as resample names it (annotations from before paths were absolute)."""
        if shard not in self._paths:
            self._paths[shard] = normalize_path(shard)
        return self._paths[shard]

    def process(self, table, solution_text, thresholds):
        rule = self.rule(solution_text)
        of_row, signatures, q_of = rule.table_signatures(table)
        keys = table.column("key").to_pylist()
        if self.mode == "repeat":
            copies = [None] * len(keys)
        else:
            fixed = np.array([-1 if found is None else found for found in map(
                rule.fixed_copies, q_of.tolist(), signatures)], dtype=np.int64)
            row_copies = fixed[of_row] if len(signatures) else np.zeros(len(keys), dtype=np.int64)
            for i in np.flatnonzero(row_copies < 0).tolist():
                signature = signatures[of_row[i]]
                row_copies[i] = rule.copies(keys[i], q_of[of_row[i]], signature,
                                            thresholds.get(signature))
            copies = row_copies.tolist()
        weights = np.array([rule.weight(q) for q in q_of.tolist()], dtype=float)
        columns = {
            "positions": table.column("position").to_pylist(), "keys": keys, "q": q_of[of_row],
            "weights": weights[of_row], "copies": copies,
            "signatures": np.array(signatures, dtype=object)[of_row]
        }
        shards = pc.dictionary_encode(
            table.column("shard").combine_chunks()) if table.num_rows else None
        paths = [self._path(shard)
                 for shard in shards.dictionary.to_pylist()] if shards is not None else []
        if len(paths) == 1:
            yield paths[0], {name: _as_list(values) for name, values in columns.items()}
        elif paths:
            of_shard = shards.indices.to_numpy(zero_copy_only=False)
            # one batch per input file, in path order
            for code in np.argsort(paths, kind="stable").tolist():
                rows = np.flatnonzero(of_shard == code)
                yield paths[code], {
                    name: _as_list(values, rows)
                    for name, values in columns.items()
                }
        yield counted({"decisions_read": table.num_rows})


def _as_list(values, rows=None) -> list:
    """A batch column as a plain list (rows: those of one input file), the way Beam's coder is fast
    on."""
    if rows is None:
        return values if isinstance(values, list) else values.tolist()
    if isinstance(values, list):
        return [values[i] for i in rows.tolist()]
    return values[rows].tolist()


# Exact mode finds each ranked signature's k-th smallest draw among its n rows by looking only at
# the draws near k/n: rows below the window are counted, rows inside it travel. The window is wide
# enough that it misses the k-th draw with probability below exp(-THRESHOLD_WINDOW_LOG) on each side
# (Hoeffding's bound on the count of uniform draws below its edge); a miss stops the job, it never
# changes a release. A signature of 2M rows sends about 10,000 draws instead of 1.8M.
THRESHOLD_WINDOW_LOG = 30.0


def threshold_window(rows: int, keep: int) -> tuple[float, float]:
    """[low, high] of the draws that can be the keep-th smallest of `rows` uniform draws."""
    share, half = keep / rows, math.sqrt(THRESHOLD_WINDOW_LOG / (2 * rows))
    return share - half, share + half


class RankCandidates(_SolutionUser):
    """Exact mode: a table of annotation rows -> per ranked signature in it, how many of its draws
    lie below the signature's threshold window and the (draw, key) of those inside it, keyed by the
    signature for the merge."""

    def process(self, table, solution_text):
        rule = self.rule(solution_text)
        of_row, signatures, _ = rule.table_signatures(table)
        windows = [() if counts is None else threshold_window(*counts)
                   for counts in map(rule.exact_signature, signatures)]
        ranked = np.array([bool(window) for window in windows], dtype=bool)
        rows = np.flatnonzero(ranked[of_row]) if len(signatures) else np.zeros(0, dtype=np.int64)
        if not len(rows):
            return
        keys = table.column("key").take(pa.array(rows)).to_pylist()
        below, inside = collections.Counter(), collections.defaultdict(list)
        for key, code in zip(keys, of_row[rows].tolist()):
            window = windows[code]
            draw = hashing.keyed_uniform(self.seed, key)
            if draw < window[0]:
                below[code] += 1
            elif draw <= window[1]:
                inside[code].append((draw, key))
        for code in sorted(set(below) | set(inside), key=signatures.__getitem__):
            signature = signatures[code]
            yield signature, (rule.exact_signature(signature)[1], below[code], inside[code])


class MergeWindows(beam.CombineFn):
    """A ranked signature's (k_s, draws below its window, draws inside it) from every table, merged.

    A combiner, so each worker merges its own tables' parts before the shuffle: one element per
    signature and bundle crosses the runner, not one per table.
    """

    def create_accumulator(self):
        return [None, 0, []]

    def add_input(self, merged, part):
        keep, below, window = part
        merged[0] = keep
        merged[1] += below
        merged[2].extend(window)
        return merged

    def merge_accumulators(self, accumulators):
        accumulators = iter(accumulators)
        merged = next(accumulators)
        for keep, below, window in accumulators:
            merged[0] = keep if keep is not None else merged[0]
            merged[1] += below
            merged[2].extend(window)
        return merged

    def extract_output(self, merged):
        return tuple(merged)


def threshold(signature: str, merged) -> tuple:
    """The k_s-th smallest (draw, key) of a signature's rows (rows at or below it are the k_s kept),
    from its merged window."""
    count, below, inside = merged
    rank = count - below  # the k_s-th smallest is this one (1-based) of the window's
    if not 1 <= rank <= len(inside):
        raise DataError(
            f"exact-count sampling: the {count}-th smallest draw of signature {signature} lies "
            f"outside its window ({below} draws below it, {len(inside)} inside), which happens "
            "with probability below 1e-13; re-run resample with another --seed")
    return signature, heapq.nsmallest(rank, inside)[-1]


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
                | "MergeWindows" >> beam.CombinePerKey(MergeWindows())
                | "Thresholds" >> beam.MapTuple(threshold)
                | "AsDict" >> beam.combiners.ToDict())


# A decision batch as it travels to the input range it describes: one Arrow table per range, through
# files in resample's work folder (file_shuffle.SpillParts), so only references to them cross the
# runner; the local runner carried a million rows of decisions as Python lists through its driver,
# in a stage of its own (CoGroupByKey's Flatten), for about a second.
DECISION_SCHEMA = pa.schema([("positions", pa.int64()), ("keys", pa.string()), ("q", pa.float64()),
                             ("weights", pa.float64()), ("copies", pa.int64()),
                             ("signatures", pa.string())])


def route_to_ranges(shard_and_batch, range_starts):
    """(input file, batch) -> ((file, range index), DECISION_SCHEMA table of the batch's rows in
    that range) for each range of the file the batch touches, rows in batch order.

    range_starts: file -> sorted positions its ranges start at; a file not read now is range 0.
    """
    shard, batch = shard_and_batch
    table = pa.Table.from_pydict({name: batch[name] for name in DECISION_SCHEMA.names},
                                 schema=DECISION_SCHEMA)
    starts = range_starts.get(shard)
    if not starts or len(starts) == 1:
        yield (shard, 0), table
        return
    # the range whose start is the last one at or before each row's position
    ranges = np.searchsorted(np.asarray(starts, dtype=np.int64),
                             np.asarray(batch["positions"], dtype=np.int64), side="right") - 1
    for index, part in parts_by_bucket(table, np.maximum(ranges, 0)):
        yield (shard, index), part


def read_decisions(file_range, references) -> dict:
    """The decisions of one input range as one batch (a dict of lists) in the order of their
    positions, from the references SpillParts gave for its tables (which come in no set order)."""
    if not references:
        return _empty_batch()
    _, table = read_bucket((file_range, references))
    table = table.sort_by([("positions", "ascending"), ("keys", "ascending")])
    return {name: table.column(name).to_pylist() for name in DECISION_SCHEMA.names}


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
            rows = [
                row for part in parts
                for row in zip(part["order"], part["keys"], part["shard"], part["positions"],
                               part["q"], part["weights"], part["signatures"])
            ]
            rows.sort(key=lambda row: (row[0], row[1]))
            starts, running = [], 0
            for row in rows:
                starts.append(running)
                running += release.repeat_mass(row[4])
            yield bucket, (rows, starts)
            yield beam.pvalue.TaggedOutput("totals", (bucket, running))

        sorted_buckets = (
            decisions
            | "ByOrderBucket" >> beam.FlatMap(by_order_bucket).with_output_types(KV[int, Batch])
            | "GroupOrderBucket" >> beam.GroupByKey()
            | "SortBucket" >> beam.FlatMap(sort_bucket).with_output_types(
                KV[int, Batch]).with_outputs("totals", main="rows"))
        offsets = (sorted_buckets.totals
                   | "AllTotals" >> beam.combiners.ToList()
                   | "Offsets" >> beam.Map(bucket_offsets))
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
                copies = release.repeat_copies(start, end, total, target, offset_uniform)
                _add_decision(batches, shard, position, key, q, weight, copies, signature)
            yield from batches.items()

        return sorted_buckets.rows | "Copies" >> beam.FlatMap(
            with_copies, beam.pvalue.AsSingleton(offsets),
            beam.pvalue.AsSingleton(size)).with_output_types(KV[str, Batch])


def bucket_offsets(totals) -> dict:
    offsets, running = {}, 0
    for bucket, total in sorted(totals):
        offsets[bucket] = running
        running += total
    return {"offsets": offsets, "total": running}
