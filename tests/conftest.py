"""Shared test fixtures: the real COCO data in ../shared/data and WebDataset shards built from it.

Session-scoped, so every test area reuses one set of shards.
"""
import dataclasses
import json
import os
import pathlib

import pytest

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
COCO_MINI_SHARDS = 3  # 159 images -> 53 samples per shard


@dataclasses.dataclass(frozen=True)
class CocoMiniShards:
    """WebDataset tars (img2dataset layout) built from ../shared/data/coco_mini.

    records: one dict per sample, in shard order: key, shard (path str), image_id (str),
    caption (the image's first caption in the COCO file), captions (all of them), jpg (bytes),
    json (the KEY.json dict).
    """
    directory: pathlib.Path
    paths: tuple
    records: tuple

    @property
    def glob(self):
        return str(self.directory / "coco-mini-*.tar")


# CI sets this: there a missing ../shared/data is a broken checkout, not a reason to skip tests.
REQUIRE_SHARED_DATA = "BALANCEBEAM_REQUIRE_SHARED_DATA"


@pytest.fixture(scope="session")
def shared_data():
    """Path of ../shared/data (real COCO files); skips when the checkout has no shared data
    (fails instead where BALANCEBEAM_REQUIRE_SHARED_DATA=1, as in CI)."""
    if not (SHARED_DATA / "coco_mini").is_dir():
        message = f"real COCO test data not found at {SHARED_DATA}"
        if os.environ.get(REQUIRE_SHARED_DATA) == "1":
            pytest.fail(f"{message} ({REQUIRE_SHARED_DATA}=1)")
        pytest.skip(message)
    return SHARED_DATA


def _coco_mini_images(coco_mini):
    images, captions = {}, {}
    for split in ("train2017", "val2017"):
        document = json.loads((coco_mini / f"captions_{split}.json").read_text())
        for image in document["images"]:
            images[image["id"]] = image
        for annotation in document["annotations"]:
            captions.setdefault(annotation["image_id"], []).append(annotation["caption"].strip())
    return [(images[i], captions[i]) for i in sorted(images, key=lambda i: images[i]["file_name"])]


def write_webdataset_shards(directory, samples, samples_per_shard, prefix="coco-mini"):
    """Writes samples ({"__key__", ext: bytes}) as {prefix}-{NNNNN}.tar with webdataset's TarWriter.
    """
    import webdataset

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for start in range(0, len(samples), samples_per_shard):
        path = directory / f"{prefix}-{len(paths):05d}.tar"
        with webdataset.TarWriter(str(path)) as writer:
            for sample in samples[start:start + samples_per_shard]:
                writer.write(sample)
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def webdataset_writer():
    """write_webdataset_shards(directory, samples, samples_per_shard, prefix) -> [paths]."""
    return write_webdataset_shards


@pytest.fixture(scope="session")
def coco_mini_shards(shared_data, tmp_path_factory):
    """Three real WebDataset tars from the 159 coco_mini images: KEY.jpg (the original JPEG
    bytes), KEY.txt (the image's first caption), KEY.json (image_id, caption, url, size)."""
    coco_mini = shared_data / "coco_mini"
    pairs = _coco_mini_images(coco_mini)
    per_shard = -(-len(pairs) // COCO_MINI_SHARDS)
    directory = tmp_path_factory.mktemp("coco_mini_shards")
    samples, records = [], []
    for index, (image, captions) in enumerate(pairs):
        shard_index, row = divmod(index, per_shard)
        key = f"{shard_index:05d}{row:04d}"  # img2dataset's key: shard id + index in shard
        jpg = (coco_mini / "images" / image["file_name"]).read_bytes()
        meta = {"key": key, "image_id": image["id"], "caption": captions[0],
                "url": image.get("coco_url") or image.get("flickr_url"),
                "width": image["width"], "height": image["height"], "status": "success"}
        samples.append({"__key__": key, "jpg": jpg, "txt": captions[0].encode("utf-8"),
                        "json": json.dumps(meta).encode("utf-8")})
        records.append({"key": key, "image_id": str(image["id"]), "caption": captions[0],
                        "captions": tuple(captions), "jpg": jpg, "json": meta})
    paths = write_webdataset_shards(directory, samples, per_shard)
    for record in records:
        record["shard"] = str(paths[int(record["key"][:5])])
    return CocoMiniShards(directory, tuple(paths), tuple(records))


# A deliberately tiny open_clip ViT (about 1.7 M parameters, mostly the token embedding): the real
# open_clip code path, random weights, a forward pass in milliseconds on CPU.
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@dataclasses.dataclass(frozen=True)
class TinyClip:
    architecture: str
    config_path: pathlib.Path
    checkpoint_path: pathlib.Path


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A tiny randomly initialised open_clip model saved as a state dict (seed 0), with the
    model config JSON that registers its architecture name."""
    import open_clip
    import torch

    directory = tmp_path_factory.mktemp("tiny_clip")
    architecture = "bbtest-tiny-vit"
    config_path = directory / f"{architecture}.json"
    config_path.write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(str(config_path))
    torch.manual_seed(0)
    model = open_clip.create_model(architecture, pretrained=None)
    checkpoint_path = directory / "tiny-vit-seed0.pt"
    torch.save({"state_dict": model.state_dict()}, checkpoint_path)
    return TinyClip(architecture, config_path, checkpoint_path)



@pytest.fixture
def job_service():
    """A local portable job service, a separate process as a user would start it; yields its port.
    """
    from pipeline.job_service import local_job_service

    with local_job_service() as port:
        yield port
