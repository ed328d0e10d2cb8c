"""The batch coder: Beam's default bytes when an element crosses the runner, a size from lengths
when Beam samples one, and the jobs' batch outputs typed so that they get it."""
import apache_beam as beam
import pyarrow as pa
from apache_beam.coders.coders import FastPrimitivesCoder

from pipeline.coders import Batch, BatchCoder, estimated_size


def _samples(n):
    return [{"key": f"{i:08x}", "caption": "a person riding a horse " * 3,
             "members": {"jpg": bytes(5000 + i), "txt": b"x" * 40}} for i in range(n)]


def test_batch_coder_encodes_like_beams_default_and_estimates_from_lengths():
    coder, default = BatchCoder(), FastPrimitivesCoder()
    batch = _samples(300)
    assert coder.encode(batch) == default.encode(batch)
    assert coder.decode(coder.encode(batch)) == batch
    table = pa.table({"key": [s["key"] for s in batch], "n": list(range(300))})
    assert coder.decode(coder.encode(table)).equals(table)
    assert coder.estimate_size(table) == table.nbytes
    # within a few percent of the encoded size, from four of the 300 samples (images grow by 1 B
    # per sample, so the first four stand for the rest up to that drift)
    encoded = len(default.encode(batch))
    assert 0.9 * encoded < estimated_size(batch) < 1.1 * encoded
    assert estimated_size((7, table)) == 8 + table.nbytes
    assert estimated_size([]) == 1 and estimated_size({"a": "xyz"}) == 3
    # the hint chooses the coder and constrains nothing: Beam's runtime type check accepts any batch
    from apache_beam.typehints.typehints import check_constraint

    for value in (batch, table, {"keys": []}, ("path", batch)):
        check_constraint(Batch, value)


def _coders_of(pipeline):
    proto, context = pipeline.to_runner_api(return_context=True)
    return {pc.unique_name: context.coders.get_by_id(pc.coder_id)
            for pc in proto.components.pcollections.values()}


def test_the_jobs_batch_outputs_get_the_batch_coder(tmp_path):
    """The outputs that carry batches (a list of samples, an Arrow table, a dict of columns) must
    get BatchCoder, or Beam encodes nearly each of them to sample its size."""
    from pipeline import annotate, resample

    source = tmp_path / "captions.jsonl"
    source.write_text('{"key": "a", "caption": "a man"}\n')
    args = annotate.build_parser().parse_args(["--input", str(source), "--output",
                                                str(tmp_path / "out")])
    args.key_column, args.caption_column = "key", "caption"
    pipeline = beam.Pipeline()
    annotate.annotate_pipeline(pipeline, args)
    coders = _coders_of(pipeline)
    for label in ("ReadRanges", "CheckSamples", "LabelText", "RowGroups"):
        assert [c for name, c in coders.items()
                if f"/{label}" in name and name.endswith(".None")] != []
        assert all(isinstance(c, BatchCoder) for name, c in coders.items()
                   if f"/{label}" in name and name.endswith(".None")), label

    import pyarrow.parquet as pq

    from pipeline.records import ANNOTATION_SCHEMA

    (tmp_path / "out").mkdir()  # Beam's Parquet source checks its glob as the graph is built
    pq.write_table(ANNOTATION_SCHEMA.empty_table(), tmp_path / "out" / "annotations-0.parquet")
    pipeline = beam.Pipeline()
    resample.build_pipeline(
        pipeline, input_glob=[str(source)], annotations_dir=str(tmp_path / "out"),
        solution_path=str(tmp_path / "solution.json"), output_dir=str(tmp_path / "release"),
        work_dir=str(tmp_path / "work"), seed=0, mode="exact", samples_per_shard=10,
        prefix="balanced", buckets=2)
    coders = _coders_of(pipeline)

    def value_coder(name_part):
        found = [c for name, c in coders.items() if name_part in name and name.endswith(".None")]
        assert found, name_part
        return found[-1]

    assert isinstance(value_coder("ReadAnnotationsToDecide/Read/SDFBoundedSourceReader"),
                      BatchCoder)
    for label in ("Decisions/Decide", "WriteShards/RouteToRanges", "WriteShards/ResampleRange",
                  "WriteShards/SortAndRank"):
        components = value_coder(label).value_coder()
        assert isinstance(components, BatchCoder), (label, value_coder(label))
    assert Batch is BatchCoder().to_type_hint()
