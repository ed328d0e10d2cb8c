"""Benchmark of the trainer: data-loader samples/s (decode + tokenize) and training steps/s.

Ratios are against raw tar iteration of the same shards in the same process.
Usage: python bench/trainer.py [--device cpu|cuda] [--samples 4000] [--steps 40]
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import webdataset as wds

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer import data, losses, models  # noqa: E402
from trainer.synth import SynthConfig, make_synthetic  # noqa: E402

# A ViT-B/16-sized CLIP (open_clip's built-in "ViT-B-16", 224 px) for GPU runs; the tiny one on CPU.
MODEL_FOR_DEVICE = {"cpu": "bb-tiny-vit", "cuda": "ViT-B-16"}


def timed(function):
    start = time.perf_counter()
    count = function()
    return count, time.perf_counter() - start


def raw_tar_samples(urls):
    return sum(1 for _ in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()))


def loader_samples(urls, preprocess, tokenizer, workers, batch_size):
    pipeline = data.training_pipeline(urls, preprocess, tokenizer, batch_size, shuffle_buffer=1000)
    return sum(images.shape[0] for images, _, _ in data.training_loader(pipeline, workers))


def training_steps_per_second(model_name, urls, device, steps, batch_size, workers):
    model, tokenizer, preprocess, _ = models.create_model(model_name, device=device)
    loss_fn = losses.make_loss("clip")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    use_bf16 = device == "cuda"
    done, start = 0, None
    while done < steps + 3:
        pipeline = data.training_pipeline(urls, preprocess, tokenizer, batch_size, shuffle_buffer=1000)
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=sorted(MODEL_FOR_DEVICE), default="cpu")
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    torch.set_flush_denormal(True)
    model_name = MODEL_FOR_DEVICE[args.device]
    _, tokenizer, preprocess, _ = models.create_model(model_name)
    image_size = preprocess.transforms[0].size[0] if hasattr(preprocess.transforms[0], "size") else 64
    with tempfile.TemporaryDirectory() as folder:
        make_synthetic(folder, SynthConfig(num_samples=args.samples, image_size=64, samples_per_shard=500))
        urls = data.expand_shards(folder)
        count, seconds = timed(lambda: raw_tar_samples(urls))
        reference = count / seconds
        rows = [("raw tar iteration (reference)", reference, 1.0)]
        for workers in (0, 1, 2):
            count, seconds = timed(lambda: loader_samples(urls, preprocess, tokenizer, workers, args.batch_size))
            rows.append((f"loader: decode+preprocess {image_size}px+tokenize, {workers} workers",
                         count / seconds, count / seconds / reference))
        workers = 2 if args.device == "cuda" else 0
        steps_per_second = training_steps_per_second(model_name, urls, args.device, args.steps,
                                                     args.batch_size, workers)
        samples_per_second = steps_per_second * args.batch_size
        rows.append((f"training {model_name} on {args.device}, batch {args.batch_size} "
                     f"({steps_per_second:.2f} steps/s)", samples_per_second, samples_per_second / reference))
    print(f"| measurement ({args.samples} synthetic 64 px samples, torch threads {torch.get_num_threads()}) "
          "| samples/s | ratio to raw tar |")
    print("|---|---:|---:|")
    for name, rate, ratio in rows:
        print(f"| {name} | {rate:,.0f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
