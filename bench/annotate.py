"""Benchmark of the annotate job: samples/s on DirectRunner (1 and 2 workers) against a plain loop.

Prints a table with ratios against the plain-Python loop measured in the same run, and peak memory;
then the image check of each --validate-images level on the same JPEGs, one process, against the
full decode. With --repeats N every mode runs N times, the modes taking turns (loop, 1 worker, 2
workers, header, loop, ...), so a minute in which the machine runs slow touches every mode; the
table gives each mode's median, the ratio of the medians and the range of the ratios of each round.
Usage: python bench/annotate.py [--sizes 2000 6000] [--samples-per-shard 250] \
           [--validation-images 5000] [--repeats 1]
"""
import argparse
import io
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
COCO_MINI = ROOT.parent / "shared" / "data" / "coco_mini"
sys.path.insert(0, str(ROOT))

# Each measurement runs in a fresh interpreter so that its peak memory is its own.
_CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})
from bench.memory import MemorySampler
mode, glob, output = sys.argv[1:4]
sampler = MemorySampler()
start = time.perf_counter()
if mode == "loop":
    from bench.annotate import plain_loop
    count = plain_loop(glob)
else:
    from pipeline import annotate
    workers, _, level = mode.partition(":")
    annotate.run(["--input", glob, "--output", output, "--direct_running_mode=multi_processing",
                  "--direct_num_workers=" + workers, "--validate-images", level or "full"])
    count = annotate.read_counts(output)["annotated"]
seconds = time.perf_counter() - start
print(json.dumps({{"count": count, "seconds": seconds, "peak_mib": sampler.stop() / 2**20}}))
"""
def plain_loop(glob):
    """The reference: the same reading, decoding and matching as the job, in one Python loop."""
    import glob as globbing

    from apache_beam.pvalue import TaggedOutput

    from trainer.images import decode_image
    from pipeline.annotators.text import TextAnnotator
    from pipeline.labelling import image_member
    from pipeline.sources import iter_tar_samples

    from pipeline.worker_tuning import relax_gc

    relax_gc()  # the job's workers run with it: the loop gets the same process settings
    annotator = TextAnnotator()
    annotated = 0
    for path in sorted(globbing.glob(glob)):
        with open(path, "rb") as handle:
            for sample in iter_tar_samples(handle, path):
                if isinstance(sample, TaggedOutput) or not (sample["caption"] or "").strip():
                    continue
                decode_image(image_member(sample["members"]))
                annotator(sample["caption"])
                annotated += 1
    return annotated


def _source_pairs():
    """(jpeg bytes, caption) pairs: coco_mini when present, else generated pictures."""
    if COCO_MINI.is_dir():
        captions = {}
        files = {}
        for split in ("train2017", "val2017"):
            document = json.loads((COCO_MINI / f"captions_{split}.json").read_text())
            files.update({image["id"]: image["file_name"] for image in document["images"]})
            for annotation in document["annotations"]:
                captions.setdefault(annotation["image_id"], annotation["caption"])
        return [((COCO_MINI / "images" / files[i]).read_bytes(), captions[i])
                for i in sorted(files)]
    from PIL import Image

    pairs = []
    for index in range(64):
        buffer = io.BytesIO()
        fractal = Image.effect_mandelbrot((384, 288), (-2 + index / 64, -1.2, 1, 1.2), 64)
        fractal.convert("RGB").save(buffer, format="JPEG", quality=90)
        pairs.append((buffer.getvalue(), f"A man and a woman look at picture {index} on a table"))
    return pairs


def write_shards(directory, total, per_shard):
    import webdataset

    pairs = _source_pairs()
    directory.mkdir(parents=True, exist_ok=True)
    for shard in range(-(-total // per_shard)):
        with webdataset.TarWriter(str(directory / f"bench-{shard:05d}.tar")) as writer:
            for row in range(min(per_shard, total - shard * per_shard)):
                jpeg, caption = pairs[(shard * per_shard + row) % len(pairs)]
                key = f"{shard:05d}{row:05d}"
                writer.write({"__key__": key, "jpg": jpeg, "txt": caption.encode(),
                              "json": json.dumps({"key": key}).encode()})
    return str(directory / "bench-*.tar")


def validation_rates(images: int) -> list[tuple[str, float]]:
    """Images per second of check_image at each level over coco_mini's JPEGs, in this process."""
    import time

    from trainer.images import VALIDATION_LEVELS, check_image

    jpegs = [jpeg for jpeg, _ in _source_pairs()]
    rates = []
    for level in VALIDATION_LEVELS:
        started = time.perf_counter()
        for index in range(images):
            check_image(jpegs[index % len(jpegs)], level)
        rates.append((level, images / (time.perf_counter() - started)))
    return rates


def measure(mode, glob, output):
    result = subprocess.run(
        [sys.executable, "-c",
         _CHILD.format(root=str(ROOT)), mode, glob, output], capture_output=True, text=True,
        check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 6000])
    parser.add_argument("--samples-per-shard", type=int, default=250)
    parser.add_argument("--validation-images", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each mode, taking turns; the table shows medians")
    args = parser.parse_args(argv)
    modes = [("plain Python loop", "loop"), ("Beam DirectRunner, 1 worker", "1"),
             ("Beam DirectRunner, 2 workers", "2"),
             ("2 workers, --validate-images header", "2:header")]
    print(
        f"{'input':>8} | {'run':<35} | {'samples/s':>9} | {'vs loop':>7} | {'rounds':>11} | "
        f"{'seconds':>7} | {'peak MiB':>8}"
    )
    print("-" * 104)
    with tempfile.TemporaryDirectory() as folder:
        for size in args.sizes:
            glob = write_shards(pathlib.Path(folder) / f"in-{size}", size, args.samples_per_shard)
            runs = {mode: [] for _, mode in modes}
            for _ in range(args.repeats):
                for _, mode in modes:
                    result = measure(mode, glob, str(pathlib.Path(folder) / f"out-{size}-{mode}"))
                    assert result["count"] == size, result
                    runs[mode].append(result)
            loop = [run["seconds"] for run in runs["loop"]]
            for label, mode in modes:
                seconds = [run["seconds"] for run in runs[mode]]
                # the loop's time over this mode's, round by round
                rounds = [mine / theirs for mine, theirs in zip(loop, seconds)]
                middle = statistics.median(seconds)
                spread = (f"{min(rounds):.2f}-{max(rounds):.2f}x" if len(rounds) > 1 else "")
                print(f"{size:>8} | {label:<35} | {size / middle:>9.0f} | "
                      f"{statistics.median(loop) / middle:>6.2f}x | {spread:>11} | "
                      f"{middle:>7.1f} | {max(run['peak_mib'] for run in runs[mode]):>8.0f}",
                      flush=True)
    if args.validation_images:
        print(f"\n--validate-images on {args.validation_images} coco_mini JPEGs, one process")
        print("| level | images/s | vs full |\n|---|---:|---:|")
        rates = validation_rates(args.validation_images)
        full = dict(rates)["full"]
        for level, rate in rates:
            print(f"| {level} | {rate:,.0f} | {rate / full:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
