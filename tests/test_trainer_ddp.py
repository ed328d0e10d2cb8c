"""DDP under torchrun: two CPU processes (gloo) train one model on disjoint shards.

The trainer joins the process group from torchrun's environment; only rank 0 logs and saves.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from trainer.synth import SynthConfig, make_synthetic

ROOT = Path(__file__).resolve().parents[1]
STEPS, LOG_EVERY = 20, 5


def test_two_process_torchrun_trains_and_only_rank_zero_writes(tmp_path):
    make_synthetic(tmp_path / "synth",
                   SynthConfig(num_samples=600, image_size=32, samples_per_shard=100, seed=0))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
        "pipeline.cli", "train", "--data", str(tmp_path / "synth"), "--output",
        str(tmp_path / "run"), "--steps", str(STEPS), "--batch-size", "16", "--threads", "1",
        "--log-every", str(LOG_EVERY)
    ]
    finished = subprocess.run(
        command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240
    )
    assert finished.returncode == 0, finished.stderr[-3000:]

    # Rank 0 alone writes the metrics: one line per logging step, not two.
    lines = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [line["step"] for line in lines] == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    assert lines[-1]["loss"] < lines[0]["loss"]
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "final.pt", weights_only=True)
    assert checkpoint["step"] == STEPS
    # DDP wraps the model; the checkpoint must hold the plain module's names, loadable without DDP.
    assert not any(name.startswith("module.") for name in checkpoint["model"])
