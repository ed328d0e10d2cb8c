"""Reading WebDataset shards (ours, img2dataset's, anyone's) for training and evaluation.

Images are decoded with PIL only (webdataset's default decoders include pickle; never used here);
a `handler` decides what a bad sample does, as in webdataset: raise, or warn and continue.
"""
import glob
import json
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
import webdataset as wds
from trainer.images import IMAGE_EXTENSIONS, decode_image

log = logging.getLogger(__name__)

# Samples held in each worker's shuffle buffer; open_clip_train uses 5000 for web-scale data,
# our CPU runs are small so a smaller buffer starts faster and still mixes several shards.
DEFAULT_SHUFFLE_BUFFER = 2000
SHUFFLE_INITIAL = 500

HANDLERS = {"raise": wds.reraise_exception, "warn": wds.warn_and_continue}


def expand_shards(spec) -> list:
    """Turn a shard spec into a sorted list of paths/URLs.

    Accepts a list, comma-separated specs, local globs ('dir/*.tar'), brace patterns
    ('shard-{00000..00009}.tar', left to webdataset), a directory of tars, or a `balancebeam synth`
    output directory (its training shards).
    """
    parts = spec if isinstance(spec, (list, tuple)) else [s for s in str(spec).split(",") if s]
    urls = []
    for part in parts:
        part = str(part)
        path = Path(part)
        if path.is_dir():
            found = sorted(glob.glob(str(path / "*.tar")))
            manifest = path / "manifest.json"
            if not found and manifest.exists():
                found = [
                    str(path / s["path"]) for s in json.loads(manifest.read_text())["train_shards"]
                ]
            urls.extend(found)
        elif any(ch in part for ch in "*?[") and "://" not in part:
            urls.extend(sorted(glob.glob(part)))
        else:
            urls.extend(wds.shardlists.expand_urls(part))
    if not urls:
        raise FileNotFoundError(f"no shards match {spec!r}")
    return urls


def decode_sample(sample: dict) -> dict:
    """Decode one raw WebDataset sample: image via PIL, caption text, json metadata (if any)."""
    image_key = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
    if image_key is None:
        raise ValueError(
            f"sample {sample.get('__key__')!r} in {sample.get('__url__')!r} has no image")
    if "txt" not in sample:
        raise ValueError(
            f"sample {sample.get('__key__')!r} in {sample.get('__url__')!r} has no txt caption")
    # allowed formats only, bounded pixels (trainer/images.py)
    rgb = decode_image(sample[image_key])
    metadata = json.loads(sample["json"]) if "json" in sample else {}
    return {"key": sample["__key__"], "image": rgb, "text": sample["txt"].decode("utf-8"),
            "metadata": metadata, "image_bytes": sample[image_key]}


def balance_weight(metadata: dict) -> float:
    """The per-sample training weight that `resample --mode weights` writes; 1 when absent."""
    weight = (metadata.get("balance") or {}).get("weight", 1.0)
    weight = float(weight)
    if not weight >= 0.0:
        raise ValueError(f"balance.weight must be >= 0, got {weight}")
    return weight


def _rank_and_worker() -> tuple:
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if distributed else 0
    info = torch.utils.data.get_worker_info()
    return rank, info.id if info is not None else 0


def seeded_sample_shuffle(bufsize: int, seed: int):
    """A shuffle stage seeded by (seed, rank, worker), so a run is reproducible for a given layout.
    """
    def stage(source):
        rank, worker = _rank_and_worker()
        rng = random.Random(f"{seed}/{rank}/{worker}")
        return wds.shuffle(bufsize, min(SHUFFLE_INITIAL, bufsize), rng=rng)(source)
    return stage


def training_pipeline(urls, preprocess, tokenizer, batch_size, seed=0, epoch=0,
                      shuffle_buffer=DEFAULT_SHUFFLE_BUFFER, on_bad_sample="warn"):
    """WebDataset pipeline yielding (images, tokens, weights) batches for one epoch.

    Shards are shuffled identically on every rank and worker (seed + epoch) and then split among
    them, so each sample is read once per epoch; samples are shuffled in a buffer per worker.
    """
    handler = HANDLERS[on_bad_sample]

    def to_training_tuple(sample):
        text = tokenizer([sample["text"]])[0]
        return preprocess(sample["image"]), text, balance_weight(sample["metadata"])

    stages = [
        wds.SimpleShardList(list(urls), seed=seed * 1_000_003 + epoch),
        wds.split_by_node,
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=handler),
    ]
    if shuffle_buffer > 1:
        stages.append(seeded_sample_shuffle(shuffle_buffer, seed * 1_000_003 + epoch))
    stages += [
        wds.map(decode_sample, handler=handler),
        wds.map(to_training_tuple, handler=handler),
        wds.batched(batch_size, partial=False, collation_fn=collate_training_batch),
    ]
    return wds.DataPipeline(*stages)


def collate_training_batch(samples):
    images, tokens, weights = zip(*samples)
    return torch.stack(images), torch.stack(tokens), torch.tensor(weights, dtype=torch.float32)


def training_loader(pipeline, workers: int):
    """A DataLoader over an already-batched pipeline (batching happens inside the workers)."""
    return torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=workers,
                                       persistent_workers=False,
                                       pin_memory=torch.cuda.is_available())


@dataclass
class LabelledSet:
    """Images (encoded bytes, decoded lazily in batches), captions and label dicts, for evaluation.
    """

    keys: list = field(default_factory=list)
    image_bytes: list = field(default_factory=list)
    captions: list = field(default_factory=list)
    labels: list = field(default_factory=list)
    skipped: list = field(default_factory=list)  # (key or path, reason) for unreadable samples

    def __len__(self):
        return len(self.keys)

    def add(self, key, image_bytes, caption, labels):
        self.keys.append(key)
        self.image_bytes.append(image_bytes)
        self.captions.append(caption)
        self.labels.append(labels)

    def images(self, start, stop, preprocess):
        """Decode and preprocess images start..stop into one tensor batch."""
        tensors = []
        for data in self.image_bytes[start:stop]:
            tensors.append(preprocess(decode_image(data)))
        return torch.stack(tensors)


def labels_from_metadata(metadata: dict) -> dict:
    """Labels live in json['labels'] (our synth and evaluation sets); top-level keys also count."""
    labels = {key: value for key, value in metadata.items() if isinstance(value, str)}
    labels.update(metadata.get("labels") or {})
    return labels


def read_labelled_shards(spec, on_bad_sample="warn") -> LabelledSet:
    """Read every sample of some WebDataset shards, in order, keeping labels from the json."""
    result = LabelledSet()
    dataset = wds.DataPipeline(wds.SimpleShardList(expand_shards(spec)),
                               wds.tarfile_to_samples(handler=HANDLERS[on_bad_sample]))
    for sample in dataset:
        try:
            decoded = decode_sample(sample)
        except Exception as error:  # noqa: BLE001 - policy decides: raise or record and go on
            if on_bad_sample == "raise":
                raise
            result.skipped.append((sample.get("__key__"), f"{type(error).__name__}: {error}"))
            continue
        result.add(decoded["key"], decoded["image_bytes"], decoded["text"],
                   labels_from_metadata(decoded["metadata"]))
    return result


def read_image_folders(root, label_key: str) -> LabelledSet:
    """Read root/LABEL/*.jpg|png|webp as images labelled {label_key: LABEL}; KEY.txt is the caption.
    """
    root = Path(root)
    result = LabelledSet()
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(folder.iterdir()):
            if path.suffix.lower().lstrip(".") not in IMAGE_EXTENSIONS:
                continue
            data = path.read_bytes()
            try:
                decode_image(data)
            except Exception as error:  # noqa: BLE001 - unreadable files are reported, not fatal
                result.skipped.append((str(path), f"{type(error).__name__}: {error}"))
                continue
            caption_path = path.with_suffix(".txt")
            caption = caption_path.read_text().strip() if caption_path.exists() else None
            result.add(f"{folder.name}/{path.stem}", data, caption, {label_key: folder.name})
    if not len(result):
        raise FileNotFoundError(f"no images in label folders under {root}")
    return result


def read_labelled(source, label_key="perceived_gender", on_bad_sample="warn") -> LabelledSet:
    """Read an evaluation set: a synth output dir (its eval shards), shard spec, or label folders.
    """
    path = Path(str(source))
    if path.is_dir() and (path / "manifest.json").exists() and (path / "eval").is_dir():
        manifest = json.loads((path / "manifest.json").read_text())
        return read_labelled_shards([str(path / s["path"]) for s in manifest["eval_shards"]],
                                    on_bad_sample)
    if path.is_dir() and not glob.glob(os.path.join(str(path), "*.tar")):
        return read_image_folders(path, label_key)
    return read_labelled_shards(str(source), on_bad_sample)
