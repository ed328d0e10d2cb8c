"""The resample job: apply a solution to every record and write the balanced WebDataset release.

q comes from the record's annotated features and the solution (a side input); keyed-hash sampling
and a keyed-hash order make the release the same whatever the runner or the number of workers.
Image bytes never cross a shuffle: the join and the ranking carry where each large member lies in
its input tar, and the worker writing an output shard reads it from there, once.
"""
from __future__ import annotations

import argparse
import json
import logging
import posixpath
import sys

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from pipeline import hashing, release
from pipeline.balance import ANNOTATIONS_GLOB, read_text, write_text_atomically
from pipeline.options import pipeline_options
from pipeline.quarantine import QUARANTINE_TAG, WriteQuarantine, quarantine_record
from pipeline.sources import FORMATS, ReadSamples
from solvers.solution import BalanceSolution

log = logging.getLogger(__name__)

METRICS_NAMESPACE = "balancebeam"
MANIFEST_FILE = "manifest.json"
KEPT_SIGNATURES_FILE = "kept-signatures.jsonl"
STAGE_RESAMPLE = "resample"
NOT_ANNOTATED = "not_annotated"  # read now, but the annotate job quarantined or never saw it
DUPLICATE_KEY = "duplicate_key"
# Keys per bucket when ranking kept records: each bucket is sorted in one worker's memory.
RANK_BUCKET_SIZE = 100_000
_ANNOTATION_COLUMNS = ["key", "shard", "position", "attributes", "concepts", "utility"]
_KEPT_SIGNATURE_TAG = "kept_signature"
_OUTCOME_TAG = "outcome"


class _SolutionUser(beam.DoFn):
    """A DoFn that reads the solution from its side input once per worker."""

    def __init__(self, seed: int, mode: str):
        self.seed, self.mode = seed, mode
        self._rule, self._text = None, None

    def rule(self, solution_text: str) -> release.KeepRule:
        if self._rule is None or not (self._text is solution_text or self._text == solution_text):
            self._rule = release.KeepRule(BalanceSolution.from_json(solution_text), self.seed, self.mode)
            self._text = solution_text
        return self._rule


class Decide(_SolutionUser):
    """Annotation row -> (key, decision): q, copies (bernoulli/weights), weight, signature."""

    def process(self, row, solution_text):
        rule = self.rule(solution_text)
        signature, q = rule.signature_and_probability(row.get("attributes"), row.get("concepts"), row.get("utility"))
        yield row["key"], {
            "shard": row.get("shard"), "position": row.get("position"), "q": q,
            "copies": None if self.mode == "repeat" else rule.copies(row["key"], q),
            "weight": rule.weight(q), "signature": signature,
        }


class _Bucket(beam.DoFn):
    def process(self, element, count):
        identifier, order, mass, payload = element
        buckets = max(1, -(-count // RANK_BUCKET_SIZE))
        yield min(int(order * buckets), buckets - 1), (order, identifier, mass, payload)


def _prefix_within_bucket(bucket_and_items):
    """Sort one bucket by (order, id); running integer sums of the masses."""
    bucket, items = bucket_and_items
    running = 0
    for order, identifier, mass, payload in sorted(items, key=lambda item: (item[0], item[1])):
        yield bucket, identifier, running, running + mass, payload
        running += mass
    yield beam.pvalue.TaggedOutput("totals", (bucket, running))


def _offsets(totals):
    offsets, running = {}, 0
    for bucket, total in sorted(totals):
        offsets[bucket] = running
        running += total
    return {"offsets": offsets, "total": running}


class HashOrderPrefix(beam.PTransform):
    """(id, order in [0,1), integer mass, payload) -> (id, start, end, payload) along the order.

    start/end are exact running sums of the masses in (order, id) order: with mass 1, start is the
    record's rank. Buckets are contiguous ranges of the order, sized from the count, so no single
    worker sorts everything. Also returns the total mass as a one-element PCollection.
    """

    def expand(self, elements):
        count = elements | "Count" >> beam.combiners.Count.Globally()
        sorted_parts = (elements
                        | "Bucket" >> beam.ParDo(_Bucket(), beam.pvalue.AsSingleton(count))
                        | "GroupBucket" >> beam.GroupByKey()
                        | "SortBucket" >> beam.FlatMap(_prefix_within_bucket).with_outputs("totals", main="items"))
        offsets = (sorted_parts.totals
                   | "AllTotals" >> beam.combiners.ToList()
                   | "Offsets" >> beam.Map(_offsets))
        prefixed = sorted_parts.items | "AddOffset" >> beam.Map(
            lambda item, offsets: (item[1], offsets["offsets"][item[0]] + item[2],
                                   offsets["offsets"][item[0]] + item[3], item[4]),
            beam.pvalue.AsSingleton(offsets))
        total = offsets | "Total" >> beam.Map(lambda offsets: offsets["total"])
        return prefixed, total


class RepeatCopies(beam.PTransform):
    """Repeat mode: copies proportional to q, exactly `output_size` in all (systematic sampling)."""

    def __init__(self, seed: int, output_size: int | None):
        super().__init__()
        self.seed, self.output_size = seed, output_size

    def expand(self, decisions):
        seed = self.seed
        prefixed, total = (decisions
                           | "Mass" >> beam.MapTuple(lambda key, d: (
                               key, hashing.keyed_uniform(seed, key, hashing.REPEAT), release.repeat_mass(d["q"]),
                               d))
                           | "Systematic" >> HashOrderPrefix())
        size = decisions | "DefaultSize" >> beam.combiners.Count.Globally()
        requested = self.output_size
        offset = hashing.keyed_uniform(seed, "systematic-offset", hashing.REPEAT)

        def with_copies(item, total, size):
            key, start, end, decision = item
            target = size if requested is None else requested
            return key, dict(decision, copies=release.repeat_copies(start, end, total, target, offset))

        return prefixed | "Copies" >> beam.Map(
            with_copies, beam.pvalue.AsSingleton(total), beam.pvalue.AsSingleton(size))


class _BundleCounts(beam.DoFn):
    """A DoFn that tallies outcomes per bundle and emits one dict per bundle on a tagged output.

    Counting one dict per bundle instead of one element per record keeps the counts off the
    per-element path; the dicts add up to the same totals whatever the bundling.
    """

    def start_bundle(self):
        self._tallies = {}

    def tally(self, tag, name, amount=1):
        counts = self._tallies.setdefault(tag, {})
        counts[name] = counts.get(name, 0) + amount

    def finish_bundle(self):
        for tag, counts in self._tallies.items():
            yield beam.pvalue.TaggedOutput(tag, WindowedValue(counts, MIN_TIMESTAMP, [GlobalWindow()]))
        self._tallies = {}


def _add_counts(dicts):
    total = {}
    for counts in dicts:
        for name, amount in counts.items():
            total[name] = total.get(name, 0) + amount
    return total


class LocateMembers(_BundleCounts):
    """Sample -> (key, the sample with its large members as places in the input tar, not bytes).

    Runs fused right after the read, so the bytes never leave the worker that read them; the tar's
    header index is built once per input file (samples of one file arrive together).
    """

    def __init__(self):
        super().__init__()
        self._path, self._offsets = None, None
        self.located = Metrics.counter(METRICS_NAMESPACE, "members_located")
        self.inline = Metrics.counter(METRICS_NAMESPACE, "members_inline")

    def process(self, sample):
        self.tally(_OUTCOME_TAG, "samples_read")
        members = sample.get("members") or {}
        if members and sample.get("shard") != self._path:
            self._path, self._offsets = sample.get("shard"), _tar_offsets(sample.get("shard"))
        if not members:  # a caption-table row: small, it travels whole
            yield sample["key"], sample
            return
        located = release.locate_members(sample["key"], members, self._offsets)
        for _, data in located:
            (self.located if isinstance(data, tuple) else self.inline).inc()
        # meta, caption and image_id come again from the members when the shard is written.
        yield sample["key"], {"key": sample["key"], "shard": sample.get("shard"), "position": sample.get("position"),
                              "members": located}


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


class JoinAndDecide(_BundleCounts):
    """Per key: pair the record read now with its decision; emit its kept copies to be ranked.

    Output: (copy key, order in [0, 1), 1, (sample, balance)) for HashOrderPrefix; the sample
    carries only small members and places in the input tar, never image bytes.
    """

    def __init__(self, seed: int, mode: str):
        super().__init__()
        self.seed, self.mode = seed, mode
        self.kept = Metrics.counter(METRICS_NAMESPACE, "records_kept")
        self.dropped = Metrics.counter(METRICS_NAMESPACE, "records_dropped")

    def process(self, joined):
        key, groups = joined
        samples, decisions = list(groups["samples"]), list(groups["decisions"])
        pairs, leftovers = _pair(samples, decisions)
        for sample in leftovers:
            reason = NOT_ANNOTATED if not decisions else DUPLICATE_KEY
            yield beam.pvalue.TaggedOutput(QUARANTINE_TAG, quarantine_record(
                STAGE_RESAMPLE, reason, key, sample.get("shard"), sample.get("position"),
                "no annotation row for this record" if reason == NOT_ANNOTATED
                else "another record with this key was annotated"))
            self.tally(_OUTCOME_TAG, "quarantined")
        for sample, decision in pairs:
            if not decision["copies"]:
                self.dropped.inc()
                self.tally(_OUTCOME_TAG, "dropped")
                continue
            self.kept.inc()
            self.tally(_OUTCOME_TAG, "kept")
            for copy in range(decision["copies"]):
                balance = {"q": decision["q"], "weight": decision["weight"]}
                if self.mode == "repeat":
                    balance["copy"] = copy
                yield (release.copy_key(key, copy), release.order_uniform(self.seed, key, copy), 1,
                       (sample, balance))
                self.tally(_KEPT_SIGNATURE_TAG, decision["signature"])
                self.tally(_OUTCOME_TAG, "output_samples")


def _pair(samples, decisions):
    """Match samples to decisions: one each pairs directly; otherwise by (file name, position)."""
    if not decisions:
        return [], samples
    if len(samples) == 1 and len(decisions) == 1:
        return [(samples[0], decisions[0])], []
    decision = min(decisions, key=lambda d: (str(d["shard"]), d["position"] or 0))
    where = (posixpath.basename(str(decision["shard"])), decision["position"])
    matched = [s for s in samples if (posixpath.basename(str(s.get("shard"))), s.get("position")) == where]
    pairs = [(matched[0], decision)] if matched else []
    return pairs, [s for s in samples if not (matched and s is matched[0])]


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
    """(shard index, [(rank, key, sample, balance)]) -> one tar in rank order; yields its manifest entry.

    Large members are read here from the input tars, once, at the place LocateMembers noted.
    """

    def __init__(self, output_dir: str, prefix: str):
        self.output_dir, self.prefix = output_dir, prefix
        self.shards = Metrics.counter(METRICS_NAMESPACE, "shards_written")

    def process(self, shard):
        index, items = shard
        ordered = sorted(items, key=lambda item: item[0])
        path = FileSystems.join(self.output_dir, release.shard_name(self.prefix, index))
        inputs = _InputTars()

        def released(rank_key_sample_balance):
            _, key, sample, balance = rank_key_sample_balance
            source = sample.get("shard")
            members = release.read_members(sample.get("members") or (), lambda offset, size: inputs.read_at(
                source, offset, size), where=f"{source} ({sample.get('key')})")
            meta = sample["meta"] if "meta" in sample else release.member_meta(members)
            return key, release.release_members(dict(sample, members=members, meta=meta), balance)

        try:
            info = release.write_shard(path, map(released, ordered))
        finally:
            inputs.close()
        self.shards.inc()
        yield info


def _write_manifest(shards, outcomes, quarantined, output_dir, details):
    counts = {name: int(outcomes.get(name, 0)) for name in ("samples_read", "kept", "dropped", "output_samples")}
    counts["quarantined"] = dict(sorted(quarantined.items()))
    counts["quarantined_total"] = sum(quarantined.values())
    counts["input_records"] = counts["samples_read"] + sum(
        n for reason, n in quarantined.items() if not reason.startswith(STAGE_RESAMPLE + ":"))
    manifest = {**details, "shards": sorted(shards, key=lambda s: s["name"]), "counts": counts,
                "total_bytes": sum(s["bytes"] for s in shards)}
    write_text_atomically(FileSystems.join(output_dir, MANIFEST_FILE), json.dumps(manifest, indent=1) + "\n")
    return manifest


def _write_kept_signatures(counts, output_dir):
    lines = [json.dumps({"signature": json.loads(s), "count": n}) for s, n in sorted(counts)]
    write_text_atomically(FileSystems.join(output_dir, KEPT_SIGNATURES_FILE), "".join(l + "\n" for l in lines))


def build_pipeline(pipeline, *, input_glob, annotations_dir, solution_text, output_dir, seed, mode,
                   samples_per_shard, prefix, input_format="auto", output_size=None, details=None,
                   quarantine_prefix=None):
    """The resample graph on `pipeline` (so `run` and other jobs can share one pipeline)."""
    solution = pipeline | "Solution" >> beam.Create([solution_text])
    read = pipeline | "ReadSamples" >> ReadSamples(input_glob, input_format)
    samples = read.samples | "LocateMembers" >> beam.ParDo(LocateMembers()).with_outputs(
        _OUTCOME_TAG, main="samples")
    decisions = (pipeline
                 | "ReadAnnotations" >> beam.io.ReadFromParquet(
                     FileSystems.join(annotations_dir, ANNOTATIONS_GLOB), columns=_ANNOTATION_COLUMNS)
                 | "Decide" >> beam.ParDo(Decide(seed, mode), beam.pvalue.AsSingleton(solution)))
    if mode == "repeat":
        decisions = decisions | "RepeatCopies" >> RepeatCopies(seed, output_size)
    joined = ({"samples": samples.samples, "decisions": decisions}
              | "JoinByKey" >> beam.CoGroupByKey()
              | "JoinAndDecide" >> beam.ParDo(JoinAndDecide(seed, mode)).with_outputs(
                  QUARANTINE_TAG, _KEPT_SIGNATURE_TAG, _OUTCOME_TAG, main="copies"))
    # Kept copies are ranked along a keyed-hash order; shard i holds ranks [i*S, (i+1)*S).
    ranked, _ = joined.copies | "Order" >> HashOrderPrefix()
    shards = (ranked
              | "ByShard" >> beam.MapTuple(lambda copy_key, rank, _, payload: (
                  rank // samples_per_shard, (rank, copy_key, payload[0], payload[1])))
              | "GroupByShard" >> beam.GroupByKey()
              | "WriteShard" >> beam.ParDo(WriteShard(output_dir, prefix))
              | "AllShards" >> beam.combiners.ToList())
    outcomes = ((joined[_OUTCOME_TAG], samples[_OUTCOME_TAG])
                | "AllOutcomes" >> beam.Flatten()
                | "CountOutcomes" >> beam.CombineGlobally(_add_counts))
    quarantine = (read.quarantine, joined[QUARANTINE_TAG]) | "AllQuarantine" >> beam.Flatten()
    reasons = (quarantine
               | "Reason" >> beam.Map(lambda entry: f"{entry['stage']}:{entry['reason']}")
               | "CountReasons" >> beam.combiners.Count.PerElement())
    _ = shards | "WriteManifest" >> beam.Map(
        _write_manifest, beam.pvalue.AsSingleton(outcomes), beam.pvalue.AsDict(reasons), output_dir, details or {})
    _ = (joined[_KEPT_SIGNATURE_TAG]
         | "CountKept" >> beam.CombineGlobally(_add_counts)
         | "WriteKeptSignatures" >> beam.Map(lambda counts: _write_kept_signatures(counts.items(), output_dir)))
    if quarantine_prefix:
        _ = quarantine | "WriteQuarantine" >> WriteQuarantine(quarantine_prefix)


def remove_stale_files(output_dir: str, prefix: str) -> list[str]:
    """Shards of an earlier run that this release does not list, and leftover temporary files."""
    manifest = json.loads(read_text(FileSystems.join(output_dir, MANIFEST_FILE)))
    listed = {shard["name"] for shard in manifest["shards"]}
    pattern = FileSystems.join(output_dir, f"{prefix}-*")
    stale = [m.path for m in FileSystems.match([pattern])[0].metadata_list
             if posixpath.basename(m.path) not in listed]
    if stale:
        FileSystems.delete(stale)
    return stale


def resample(input_glob, annotations_dir, solution_path, output_dir, *, seed=release.DEFAULT_SEED,
             mode=release.DEFAULT_MODE, samples_per_shard=release.DEFAULT_SAMPLES_PER_SHARD,
             prefix=release.DEFAULT_PREFIX, input_format="auto", output_size=None, pipeline_args=()):
    """Run the resample job; return the manifest it wrote."""
    if mode not in release.MODES:
        raise ValueError(f"mode must be one of {release.MODES}, got {mode!r}")
    if samples_per_shard < 1:
        raise ValueError("samples per shard must be >= 1")
    for pattern in [input_glob] if isinstance(input_glob, str) else input_glob:
        if not FileSystems.match([pattern])[0].metadata_list:
            raise FileNotFoundError(f"no input files match {pattern!r}")
    solution_text = read_text(solution_path)
    solution = BalanceSolution.from_json(solution_text)  # fail here, not on a worker, if it is unreadable
    FileSystems.mkdirs(output_dir) if not FileSystems.exists(output_dir) else None
    details = {"format": "webdataset", "prefix": prefix, "samples_per_shard": samples_per_shard, "mode": mode,
               "seed": seed, "output_size": output_size, "input": input_glob,
               "solution_digest": release.solution_digest(solution)}
    quarantine_prefix = FileSystems.join(output_dir, "quarantine", "resample")
    earlier = FileSystems.match([quarantine_prefix + "-*.jsonl"])[0].metadata_list
    if earlier:  # an earlier run's quarantine shards, which this run's may not overwrite one for one
        FileSystems.delete([m.path for m in earlier])
    with beam.Pipeline(options=pipeline_options(pipeline_args)) as pipeline:
        build_pipeline(pipeline, input_glob=input_glob, annotations_dir=annotations_dir,
                       solution_text=solution_text, output_dir=output_dir, seed=seed, mode=mode,
                       samples_per_shard=samples_per_shard, prefix=prefix, input_format=input_format,
                       output_size=output_size, details=details, quarantine_prefix=quarantine_prefix)
    stale = remove_stale_files(output_dir, prefix)
    if stale:
        log.info("removed %d files of an earlier run that this release does not list", len(stale))
    manifest = json.loads(read_text(FileSystems.join(output_dir, MANIFEST_FILE)))
    counts = manifest["counts"]
    log.info("read %d records: kept %d, dropped %d, quarantined %d; wrote %d samples in %d shards to %s",
             counts["samples_read"], counts["kept"], counts["dropped"], counts["quarantined_total"],
             counts["output_samples"], len(manifest["shards"]), output_dir)
    return manifest


def add_release_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that say how the release is drawn and laid out (shared with `balancebeam run`)."""
    parser.add_argument("--mode", choices=release.MODES, default=release.DEFAULT_MODE,
                        help="bernoulli: keep with probability q; weights: keep q > 0 with weight q/eta; "
                             "repeat: copies proportional to q, exactly --output-size samples")
    parser.add_argument("--seed", type=int, default=release.DEFAULT_SEED)
    parser.add_argument("--samples-per-shard", type=int, default=release.DEFAULT_SAMPLES_PER_SHARD)
    parser.add_argument("--prefix", default=release.DEFAULT_PREFIX, help="shards are PREFIX-00000.tar, ...")
    parser.add_argument("--output-size", type=int, help="repeat mode: samples in the release (default: as read)")


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
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args, pipeline_args = parse_args(argv)
    try:
        resample(args.input, args.annotations, args.solution, args.output, seed=args.seed, mode=args.mode,
                 samples_per_shard=args.samples_per_shard, prefix=args.prefix, input_format=args.input_format,
                 output_size=args.output_size, pipeline_args=pipeline_args)
    except (ValueError, FileNotFoundError) as error:
        print(f"balancebeam resample: {error}", file=sys.stderr)
        return 1
    return 0
