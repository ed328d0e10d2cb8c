"""`balancebeam train`: a thin contrastive (CLIP / SigLIP) training loop over WebDataset shards.

One plain loop: AdamW, warmup + cosine, gradient clipping, bf16 autocast on CUDA, checkpoints
with resume, DDP under torchrun. Exists to measure what balancing does, not to be a framework.
"""
import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from solvers import progress as progress_policy
from trainer import data as shard_data
from trainer import losses, models

log = logging.getLogger(__name__)

# Logit scale is clamped to ln(100) after each step, as in CLIP (Radford et al. 2021) and open_clip.
MAX_LOGIT_SCALE = math.log(100)


@dataclass
class TrainConfig:
    data: str = ""  # shard spec: glob, brace pattern, directory, comma-separated list
    output: str = ""
    # open_clip architecture; None = the init checkpoint's, else models.DEFAULT_MODEL
    model: str = None
    loss: str = "clip"  # clip (softmax) or siglip (sigmoid)
    steps: int = 300
    batch_size: int = 64
    lr: float = 1e-3  # tiny models from scratch; use ~5e-4 (open_clip's default) for ViT-B sizes
    weight_decay: float = 0.1
    warmup_steps: int = 30
    grad_clip: float = 1.0  # max gradient L2 norm; 0 turns clipping off
    workers: int = 0
    # torch intra-op threads; 0 keeps torch's default. 1 avoids oversubscription on busy CPUs
    threads: int = 0
    seed: int = 0
    shuffle_buffer: int = shard_data.DEFAULT_SHUFFLE_BUFFER
    sample_weights: bool = False  # weight each sample's loss by its json balance.weight
    init_checkpoint: str = None  # fine-tune: start from these weights, fresh optimizer and schedule
    resume: str = None  # a checkpoint path, or "auto" for OUTPUT/checkpoints/latest.pt if present
    save_every: int = 0  # also checkpoint every N steps (0: only at the end)
    log_every: int = 20
    device: str = "auto"  # auto: cuda when available
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU; or fp32 / bf16
    on_bad_sample: str = "warn"  # warn (skip it and say so) or raise
    progress: bool = None  # tqdm bar; None = solvers.progress decides (a terminal, unless --quiet)


def cosine_with_warmup(warmup_steps: int, total_steps: int):
    """LR multiplier: linear warmup to 1, then cosine decay to 0, for torch's LambdaLR.

    The formula of open_clip_train.scheduler.cosine_lr, kept here rather than called: that one
    divides by zero when the warmup is as long as the run, and rises again after the last step;
    and as a LambdaLR it is saved and resumed with the optimizer. torch's SequentialLR(LinearLR,
    CosineAnnealingLR) warms up along a different line ((W + (W-1) k) / W^2, not (k + 1) / W).
    """
    def multiplier(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return multiplier


def parameter_groups(model, weight_decay):
    """No weight decay on gains, biases, embeddings of position and the logit scale (as open_clip).
    """
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        exclude = parameter.ndim < 2 or any(part in name
                                            for part in ("bn", "ln", "bias", "logit_scale"))
        (no_decay if exclude else decay).append(parameter)
    return [{"params": no_decay, "weight_decay": 0.0},
            {"params": decay, "weight_decay": weight_decay}]


def setup_distributed(device_name):
    """Join the torchrun process group when WORLD_SIZE > 1; returns (rank, world_size, device)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    rank, local_rank = 0, 0
    if world_size > 1:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        torch.distributed.init_process_group(backend="nccl" if device_name == "cuda" else "gloo")
    if device_name == "cuda":
        torch.cuda.set_device(local_rank)
        return rank, world_size, torch.device("cuda", local_rank)
    return rank, world_size, torch.device(device_name)


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically (temp file + rename) so a crash never leaves a half-written checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


def train(config: TrainConfig) -> dict:
    """Train and return a summary: final checkpoint path, steps, last losses, speed."""
    rank, world_size, device = setup_distributed(config.device)
    torch.manual_seed(config.seed + rank)
    if config.threads:
        torch.set_num_threads(config.threads)
    if device.type == "cpu":
        # Tiny-value (denormal) arithmetic in the optimizer made CPU steps ~10x slower after a few
        # dozen steps (measured with bench/trainer.py); flushing them to zero changes nothing else.
        torch.set_flush_denormal(True)
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    checkpoint_dir = output / "checkpoints"
    resume_path = checkpoint_dir / "latest.pt" if config.resume == "auto" else config.resume
    if config.resume == "auto" and not resume_path.exists():
        resume_path = None
    resumed = models.read_checkpoint(resume_path) if resume_path else None
    initial = models.read_checkpoint(
        config.init_checkpoint) if config.init_checkpoint and not resumed else None

    stored = (resumed or initial or {}).get("model_name")
    model_name = config.model or stored or models.DEFAULT_MODEL
    for source in (resumed, initial):
        if source and source["model_name"] != model_name:
            raise ValueError(f"checkpoint is a {source['model_name']} model, not {model_name}")
    model, tokenizer, train_preprocess, _ = models.create_model(model_name, device=device)
    if initial:
        model.load_state_dict(models.strip_ddp_prefix(initial["model"]))
    loss_fn = losses.make_loss(config.loss, rank=rank, world_size=world_size)
    optimizer = torch.optim.AdamW(parameter_groups(model, config.weight_decay), lr=config.lr,
                                  betas=(0.9, 0.98), eps=1e-6)  # CLIP's betas/eps for transformers
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_with_warmup(config.warmup_steps, config.steps))
    step, epoch, batch_in_epoch = 0, 0, 0
    if resumed:
        model.load_state_dict(models.strip_ddp_prefix(resumed["model"]))
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        step, epoch, batch_in_epoch = resumed["step"], resumed["epoch"], resumed["batch_in_epoch"]
        log.info("resumed from %s at step %d (epoch %d, batch %d)", resume_path, step, epoch,
                 batch_in_epoch)
    trained_model = torch.nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
    use_bf16 = device.type == "cuda" and config.precision in ("auto", "bf16")
    if config.precision == "bf16" and device.type != "cuda":
        log.warning("bf16 autocast is only used on CUDA; training in fp32 on %s", device)

    urls = shard_data.expand_shards(config.data)
    log.info("training %s with %s loss on %d shards, batch %d x %d process(es), %d steps",
             model_name, config.loss, len(urls), config.batch_size, world_size, config.steps)
    metrics_file = open(output / "metrics.jsonl", "a") if rank == 0 else None
    show_progress = rank == 0 and progress_policy.enabled(config.progress)
    progress = tqdm(total=config.steps, initial=step, disable=not show_progress, desc="train",
                    unit="step")
    recent_losses, started, started_step = [], time.perf_counter(), step

    def state():
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "step": step, "epoch": epoch,
                "batch_in_epoch": batch_in_epoch, "model_name": model_name,
                "config": dataclasses.asdict(config)}

    model.train()
    while step < config.steps:
        pipeline = shard_data.training_pipeline(urls, train_preprocess, tokenizer,
                                                config.batch_size, seed=config.seed, epoch=epoch,
                                                shuffle_buffer=config.shuffle_buffer,
                                                on_bad_sample=config.on_bad_sample)
        batches_seen = 0
        for images, texts, weights in shard_data.training_loader(pipeline, config.workers):
            batches_seen += 1
            if batches_seen <= batch_in_epoch:  # resuming mid-epoch: skip what was trained on
                continue
            images = images.to(device, non_blocking=True)
            texts = texts.to(device, non_blocking=True)
            weights = weights.to(device) if config.sample_weights else None
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                out = trained_model(images, texts)
                loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"],
                               weights=weights, logit_bias=out.get("logit_bias"))
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"loss is {loss.item()} at step {step}; lower --lr or check the data")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
            step += 1
            batch_in_epoch += 1
            recent_losses.append(loss.item())
            progress.update(1)
            if rank == 0 and (step % config.log_every == 0 or step == config.steps):
                elapsed = time.perf_counter() - started
                record = {
                    "step": step, "epoch": epoch, "loss": sum(recent_losses) / len(recent_losses),
                    "lr": scheduler.get_last_lr()[0], "logit_scale": model.logit_scale.exp().item(),
                    "steps_per_s": (step - started_step) / elapsed,
                    "samples_per_s":
                        (step - started_step) * config.batch_size * world_size / elapsed
                }
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                progress.set_postfix(loss=f"{record['loss']:.3f}",
                                     steps_s=f"{record['steps_per_s']:.1f}")
                log.info("step %d/%d  loss %.4f  lr %.2e  %.1f steps/s  %.0f samples/s", step,
                         config.steps, record["loss"], record["lr"], record["steps_per_s"],
                         record["samples_per_s"])
                recent_losses = []
            periodic = config.save_every and step % config.save_every == 0
            if rank == 0 and periodic and step < config.steps:
                save_checkpoint(checkpoint_dir / f"step-{step:07d}.pt", state())
                save_checkpoint(checkpoint_dir / "latest.pt", state())
            if step >= config.steps:
                break
        else:  # the epoch ran out of batches before the step budget
            if batches_seen == 0:
                raise RuntimeError(
                    f"no full batch of {config.batch_size} samples could be read from "
                    f"{config.data} by this process (rank {rank})")
            log.info("epoch %d done: %d batches", epoch, batches_seen)
            epoch, batch_in_epoch = epoch + 1, 0
    progress.close()
    final_path = checkpoint_dir / "final.pt"
    elapsed = time.perf_counter() - started
    if rank == 0:
        save_checkpoint(final_path, state())
        save_checkpoint(checkpoint_dir / "latest.pt", state())
        metrics_file.close()
    if world_size > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return {"checkpoint": str(final_path), "model_name": model_name, "steps": step,
            "steps_per_s": (step - started_step) / elapsed if elapsed > 0 else None}


def parse_args(argv) -> TrainConfig:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(
        prog="balancebeam train", description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog="examples:\n"
        "  balancebeam train --data 'out/release/*.tar' --output runs/balanced --steps 300\n"
        "  balancebeam train --data 'out/release/*.tar' --output runs/weighted --sample-weights "
        "--device cuda\n"
    )
    parser.add_argument("--data", required=True,
                        help="shards: glob, {a..b} pattern, directory or list")
    parser.add_argument("--output", required=True,
                        help="directory for checkpoints/ and metrics.jsonl")
    parser.add_argument(
        "--model", default=None,
        help=f"open_clip architecture (default: the checkpoint's, else {models.DEFAULT_MODEL})")
    parser.add_argument("--loss", choices=sorted(losses.LOSSES), default=defaults.loss)
    for name in ("steps", "batch_size", "warmup_steps", "workers", "threads", "seed",
                 "shuffle_buffer", "save_every", "log_every"):
        parser.add_argument("--" + name.replace("_", "-"), type=int,
                            default=getattr(defaults, name))
    for name in ("lr", "weight_decay", "grad_clip"):
        parser.add_argument("--" + name.replace("_", "-"), type=float,
                            default=getattr(defaults, name))
    parser.add_argument("--sample-weights", action="store_true",
                        help="weight the loss by json balance.weight")
    parser.add_argument("--init-checkpoint", help="start from these weights (fine-tuning)")
    parser.add_argument("--resume",
                        help="checkpoint to resume, or 'auto' for OUTPUT/checkpoints/latest.pt")
    parser.add_argument("--device", default=defaults.device)
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=defaults.precision)
    parser.add_argument("--on-bad-sample", choices=sorted(shard_data.HANDLERS),
                        default=defaults.on_bad_sample)
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    return TrainConfig(**vars(parser.parse_args(argv)))


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("trainer").setLevel(logging.INFO)
    config = parse_args(argv)
    Path(config.output).mkdir(parents=True, exist_ok=True)
    summary = train(config)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"trained {summary['steps']} steps; checkpoint {summary['checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
