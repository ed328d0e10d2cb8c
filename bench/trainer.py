"""Benchmark of the trainer: data-loader samples/s (decode + tokenize) and training steps/s.

What is measured, all in one run on the same synthetic shards (64 px JPEGs, 500 samples a shard):

* raw tar iteration (webdataset 1.x, no decoding): the reference of the "ratio to raw tar" column;
* our loader (`trainer.data.training_pipeline` + `trainer.data.training_loader`, the trainer's
  default shuffle buffer) at each `--workers` count;
* open_clip_train's own loader, `open_clip_train.data.get_wds_dataset`, at the same worker counts:
  the reference of the "ratio to open_clip" column (ours / open_clip at the same worker count;
  target >= 1.0);
* training steps/s of the tiny model on CPU (ViT-B/16 with bf16 on CUDA), unless --skip-training.

How the two loaders are made to do the same work: the same shard files, the same preprocess and
tokenizer (from `trainer.models.create_model`, the model the run trains), the same batch size and
number of DataLoader workers, and the same number of samples delivered. open_clip_train 3.x needs
webdataset<=0.2.86 (with 1.x its grouper trips on an end-of-shard marker), while this project uses
webdataset 1.x, so its loader runs in a subprocess with webdataset 0.2.86 first on PYTHONPATH,
installed once from PyPI (`pip install --no-deps --target`) into
~/.cache/balancebeam-bench/webdataset-0.2.86. It is called as `open_clip_train.main` would for
`--dataset-type webdataset`: dataset_resampled=False, world_size=1, seed=0, and train_num_samples
set to the number of samples our loader delivered at that worker count, so both yield the same
number of full batches (both drop partial batches: ours drops each worker's remainder, open_clip
stops its epoch after train_num_samples). The table shows the counts each loader saw.
Each timing covers building the loader, iterating every batch and shutting the workers down
(ours: non-persistent workers stop at the end of the epoch; open_clip's are persistent, so its
DataLoader is deleted inside the timed span). Model creation and imports are outside it.

Known differences, kept because they are each loader's own behaviour:
* open_clip shuffles shards with a 2000-shard buffer (500 initial) and samples with a 5000-sample
  buffer that fills 1000 samples before it yields; ours shuffles the shard list by seed and uses a
  per-worker 2000-sample buffer (500 initial).
* open_clip decodes with webdataset's `decode("pilrgb")` (every known field: image, txt, json),
  drops samples without caption or image with `select`; ours decodes the image with PIL through
  `trainer.images.decode_image` (pixel-count check first), the txt and the json, and also returns a
  per-sample balance weight.
* on a machine with CUDA ours pins memory (`pin_memory=True`); open_clip's WebLoader does not.

Usage: python bench/trainer.py [--device cpu|cuda] [--samples 4000] [--steps 40] [--workers 0,1,2]
       [--repeats 1] [--skip-training] [--skip-open-clip]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch
import webdataset as wds

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from trainer import data, losses, models  # noqa: E402
from trainer.synth import SynthConfig, make_synthetic  # noqa: E402

# A ViT-B/16-sized CLIP (open_clip's built-in "ViT-B-16", 224 px) for GPU runs; the tiny one on CPU.
MODEL_FOR_DEVICE = {"cpu": "bb-tiny-vit", "cuda": "ViT-B-16"}
SHUFFLE_BUFFER = data.DEFAULT_SHUFFLE_BUFFER  # what `balancebeam train` uses unless told otherwise
OPEN_CLIP_WEBDATASET = "0.2.86"  # the newest webdataset open_clip_train 3.x supports
OPEN_CLIP_WEBDATASET_DIR = (Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                            / "balancebeam-bench" / f"webdataset-{OPEN_CLIP_WEBDATASET}")
RESULT_MARK = "BENCH_RESULT "

# Runs in a subprocess whose PYTHONPATH starts with webdataset 0.2.86; argv[1] is a JSON config.
OPEN_CLIP_TIMER = textwrap.dedent("""
    import argparse, gc, json, sys, time
    config = json.loads(sys.argv[1])
    try:
        import pandas  # noqa: F401 - open_clip_train.data imports it
    except ImportError as error:
        why = f"pandas is not importable ({error}); open_clip_train.data needs it"
        print(%(mark)r + json.dumps({"error": why}))
        sys.exit(0)
    import torch
    import webdataset
    import open_clip
    from open_clip_train.data import get_wds_dataset
    from trainer import models
    torch.set_flush_denormal(True)
    _, tokenizer, preprocess, _ = models.create_model(config["model"])
    runs = []
    for workers, num_samples in config["runs"]:
        best = None
        for _ in range(config["repeats"]):
            args = argparse.Namespace(train_data="::".join(config["urls"]), val_data=None,
                                      dataset_resampled=False, train_num_samples=num_samples,
                                      train_data_upsampling_factors=None, seed=0,
                                      batch_size=config["batch_size"], workers=workers,
                                      world_size=1)
            try:
                start = time.perf_counter()
                info = get_wds_dataset(args, preprocess, is_train=True, tokenizer=tokenizer)
                seen = 0
                for images, texts in info.dataloader:
                    seen += images.shape[0]
                del info  # shuts its persistent workers down (ours stop at the end of the epoch)
                seconds = time.perf_counter() - start
            except Exception as error:  # reported in the table, e.g. fewer shards than workers
                best = {"workers": workers, "error": f"{type(error).__name__}: {error}"}
                break
            gc.collect()
            if best is None or seconds < best["seconds"]:
                best = {"workers": workers, "seen": seen, "seconds": seconds}
        runs.append(best)
    print(%(mark)r + json.dumps({"webdataset": webdataset.__version__,
                                 "webdataset_file": webdataset.__file__,
                                 "open_clip": open_clip.__version__,
                                 "torch_threads": torch.get_num_threads(), "runs": runs}))
""") % {"mark": RESULT_MARK}


def timed(function):
    start = time.perf_counter()
    count = function()
    return count, time.perf_counter() - start


def best_of(repeats, function):
    """(count, seconds) of the fastest of `repeats` runs."""
    return min((timed(function) for _ in range(repeats)), key=lambda result: result[1])


def raw_tar_samples(urls):
    return sum(1 for _ in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()))


def loader_samples(urls, preprocess, tokenizer, workers, batch_size):
    pipeline = data.training_pipeline(urls, preprocess, tokenizer, batch_size,
                                      shuffle_buffer=SHUFFLE_BUFFER)
    return sum(images.shape[0] for images, _, _ in data.training_loader(pipeline, workers))


def open_clip_webdataset_folder():
    """The private folder holding webdataset 0.2.86 (installed on first use), or (None, why not)."""
    folder = OPEN_CLIP_WEBDATASET_DIR
    if (folder / "webdataset" / "__init__.py").exists():
        return folder, None
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    install = subprocess.run([
        sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(staging),
        f"webdataset=={OPEN_CLIP_WEBDATASET}"
    ], capture_output=True, text=True)
    if install.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        error = install.stderr.strip()[-300:]
        return None, f"could not install webdataset {OPEN_CLIP_WEBDATASET}: {error}"
    try:
        staging.rename(folder)
    except OSError:  # another run installed it meanwhile
        shutil.rmtree(staging, ignore_errors=True)
    return folder, None


def open_clip_loader_runs(model_name, urls, batch_size, runs, repeats):
    """Time open_clip_train's get_wds_dataset in a subprocess; returns its JSON result or {"error"}.
    """
    folder, why_not = open_clip_webdataset_folder()
    if folder is None:
        return {"error": why_not}
    config = {
        "model": model_name, "urls": list(urls), "batch_size": batch_size, "runs": runs,
        "repeats": repeats
    }
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(folder), str(ROOT)]))
    run = subprocess.run([sys.executable, "-c", OPEN_CLIP_TIMER, json.dumps(config)],
                         capture_output=True, text=True, env=environment)
    lines = [line for line in run.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if run.returncode != 0 or not lines:
        tail = (run.stderr.strip() or run.stdout.strip())[-300:]
        tail = tail.replace("\n", " ").replace("|", "/")
        return {"error": f"open_clip subprocess failed (exit {run.returncode}): {tail}"}
    result = json.loads(lines[-1][len(RESULT_MARK):])
    if "error" not in result and not str(result["webdataset_file"]).startswith(str(folder)):
        return {
            "error": f"subprocess imported webdataset from {result['webdataset_file']}, not "
                     f"{folder}"
        }
    return result


def training_steps_per_second(model_name, urls, device, steps, batch_size, workers):
    model, tokenizer, preprocess, _ = models.create_model(model_name, device=device)
    loss_fn = losses.make_loss("clip")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    use_bf16 = device == "cuda"
    done, start = 0, None
    while done < steps + 3:
        pipeline = data.training_pipeline(urls, preprocess, tokenizer, batch_size,
                                          shuffle_buffer=SHUFFLE_BUFFER)
        for images, texts, _ in data.training_loader(pipeline, workers):
            with torch.autocast(device, dtype=torch.bfloat16, enabled=use_bf16):
                out = model(images.to(device), texts.to(device))
                loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            done += 1
            if done == 3:  # the first steps warm up allocators and kernels
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
            if done == steps + 3:
                break
    if device == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - start)


def worker_counts(text):
    counts = [int(part) for part in text.split(",") if part.strip()]
    if not counts or min(counts) < 0:
        raise argparse.ArgumentTypeError("expected comma-separated worker counts >= 0, e.g. 0,1,2")
    return counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=sorted(MODEL_FOR_DEVICE), default="cpu")
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=worker_counts, default=[0, 1, 2],
                        help="DataLoader worker counts for both loaders (default 0,1,2)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="time each loader this many times and keep the fastest (default 1)")
    parser.add_argument("--skip-training", action="store_true", help="measure the loaders only")
    parser.add_argument("--skip-open-clip", action="store_true",
                        help="do not run open_clip_train's loader")
    args = parser.parse_args(argv)
    torch.set_flush_denormal(True)
    model_name = MODEL_FOR_DEVICE[args.device]
    _, tokenizer, preprocess, _ = models.create_model(model_name)
    image_size = preprocess.transforms[0].size[0] if hasattr(preprocess.transforms[0],
                                                             "size") else 64
    repeats = max(1, args.repeats)
    with tempfile.TemporaryDirectory() as folder:
        make_synthetic(folder,
                       SynthConfig(num_samples=args.samples, image_size=64, samples_per_shard=500))
        urls = data.expand_shards(folder)
        count, seconds = best_of(repeats, lambda: raw_tar_samples(urls))
        reference = count / seconds
        rows = [("raw tar iteration (reference)", count, reference, None)]
        ours = {}
        for workers in args.workers:
            ours[workers] = best_of(
                repeats,
                lambda: loader_samples(urls, preprocess, tokenizer, workers, args.batch_size))
        if args.skip_open_clip:
            open_clip_result = {"error": "skipped (--skip-open-clip)"}
        else:
            open_clip_result = open_clip_loader_runs(model_name, urls, args.batch_size,
                                                     [[workers, ours[workers][0]]
                                                      for workers in args.workers], repeats)
        open_clip_runs = {run["workers"]: run for run in open_clip_result.get("runs", [])}
        open_clip_name = (
            f"open_clip_train {open_clip_result.get('open_clip', '?')} get_wds_dataset "
            f"(webdataset {open_clip_result.get('webdataset', OPEN_CLIP_WEBDATASET)})")
        for workers in args.workers:
            count, seconds = ours[workers]
            run = open_clip_runs.get(workers, {"error": open_clip_result.get("error", "no result")})
            if "error" in run:
                rows.append((
                    f"{open_clip_name}, {workers} workers (reference): not measured: "
                    f"{run['error']}",
                    None, None, None))
                ours_vs_open_clip = None
            else:
                open_clip_rate = run["seen"] / run["seconds"]
                rows.append((f"{open_clip_name}, {workers} workers (reference)", run["seen"],
                             open_clip_rate, 1.0))
                ours_vs_open_clip = count / seconds / open_clip_rate
            rows.append((f"ours: decode+preprocess {image_size}px+tokenize, {workers} workers",
                         count, count / seconds, ours_vs_open_clip))
        if not args.skip_training:
            workers = 2 if args.device == "cuda" else 0
            steps_per_second = training_steps_per_second(model_name, urls, args.device, args.steps,
                                                         args.batch_size, workers)
            samples_per_second = steps_per_second * args.batch_size
            rows.append((f"training {model_name} on {args.device}, batch {args.batch_size} "
                         f"({steps_per_second:.2f} steps/s)", args.steps * args.batch_size,
                         samples_per_second, None))
    print(f"| measurement ({args.samples} synthetic 64 px samples, batch {args.batch_size}, "
          f"torch threads {torch.get_num_threads()}, best of {repeats}) "
          "| samples seen | samples/s | ratio to raw tar | ratio to open_clip |")
    print("|---|---:|---:|---:|---:|")
    for name, seen, rate, ratio in rows:
        if rate is None:
            print(f"| {name} | | | | |")
            continue
        ratio_text = "" if ratio is None else f"{ratio:.3f}"
        print(f"| {name} | {seen:,} | {rate:,.0f} | {rate / reference:.3f} | {ratio_text} |")


if __name__ == "__main__":
    main()
