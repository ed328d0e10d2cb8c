"""A WebDataset release is read by the readers people use, and they find its size by themselves.

open_clip_train's `get_wds_dataset` with no `--train-num-samples` (it reads sizes.json), and Hugging
Face `datasets.load_dataset("webdataset", ...)`, each on a release of real COCO images.
"""
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from pipeline import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
TWO_WORKERS = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]


@pytest.fixture(scope="module")
def release(coco_mini_shards, tmp_path_factory):
    output = tmp_path_factory.mktemp("readers")
    assert cli.main([
        "run", "--input", coco_mini_shards.glob, "--output", str(output), "--keep-rate", "0.8",
        "--min-support", "2", "--samples-per-shard", "40", *TWO_WORKERS
    ]) == 0
    directory = output / "release"
    return directory, json.loads((directory / "manifest.json").read_text())


def test_sizes_json_lists_every_shard_with_its_sample_count(release):
    import webdataset

    directory, manifest = release
    sizes = json.loads((directory / "sizes.json").read_text())
    assert sorted(sizes) == sorted(path.name for path in directory.glob("*.tar"))
    for name, count in sizes.items():  # counted here by reading each shard
        assert count == sum(
            1 for _ in webdataset.WebDataset(str(directory / name), shardshuffle=False))
    assert sum(sizes.values()) == manifest["counts"]["output_samples"]


OPEN_CLIP_SIZE = textwrap.dedent("""
    import argparse, sys
    from open_clip_train.data import get_dataset_size, get_wds_dataset
    from trainer import models
    model, tokenizer, preprocess, _ = models.create_model("bb-tiny-vit")
    args = argparse.Namespace(train_data=sys.argv[1], val_data=None, dataset_resampled=False,
        train_num_samples=None, train_data_upsampling_factors=None, seed=0, batch_size=8,
        workers=1, world_size=1)
    info = get_wds_dataset(args, preprocess, is_train=True, tokenizer=tokenizer)
    seen = sum(images.shape[0] for images, texts in info.dataloader)
    print("size", get_dataset_size(sys.argv[1])[0], "num_samples", info.dataloader.num_samples,
          "seen", seen)
""")


@pytest.mark.slow
def test_open_clip_finds_the_release_size_by_itself(release, tmp_path):
    """No --train-num-samples: open_clip_train's get_dataset_size reads sizes.json. (open_clip_train
    3.x runs with webdataset 0.2.86, its [training] pin, installed into a private folder.)"""
    pytest.importorskip("pandas", reason="open_clip_train.data imports pandas")
    directory, manifest = release
    target = tmp_path / "webdataset-0.2.86"
    install = subprocess.run([
        sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
        "webdataset==0.2.86"
    ], capture_output=True, text=True)
    if install.returncode != 0:
        pytest.skip(
            f"could not install webdataset 0.2.86 for open_clip_train: {install.stderr[-300:]}")
    names = sorted(path.name for path in directory.glob("*.tar"))
    braces = f"{directory}/{names[0][:-9]}{{{names[0][-9:-4]}..{names[-1][-9:-4]}}}.tar"
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), str(ROOT)]))
    run = subprocess.run([sys.executable, "-c", OPEN_CLIP_SIZE, braces], capture_output=True,
                         text=True, env=environment, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    kept = manifest["counts"]["output_samples"]
    batches = -(-kept // 8)  # open_clip rounds an epoch up to whole batches of 8
    assert run.stdout.split() == [
        "size", str(kept), "num_samples", str(8 * batches), "seen", str(8 * batches)
    ]


def test_hugging_face_datasets_reads_the_release(release, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    directory, manifest = release
    shards = sorted(str(path) for path in directory.glob("*.tar"))
    dataset = datasets.load_dataset("webdataset", data_files={"train": shards}, split="train",
                                    cache_dir=str(directory.parent / "hf-cache"))
    assert len(dataset) == manifest["counts"]["output_samples"]
    assert {"__key__", "jpg", "txt", "json"} <= set(dataset.column_names)
    first = dataset[0]
    assert first["jpg"].size[0] > 0 and isinstance(first["txt"], str)
    assert "balance" in first["json"]
