"""Image zero-shot annotator: an open_clip model scores attribute and concept prompts per image.

Batched; the model comes from an architecture name plus a local (or FileSystems) checkpoint. For
a pool with precomputed image embeddings (DataComp's `l14_img`), `balancebeam embed-prompts`
stores the prompts' embeddings once (prompts.npz) and workers score rows with a matrix product,
no model loaded (ZeroShotConfig.prompt_embeddings).
"""
import dataclasses
import io
import json
import os
import tempfile

import numpy as np

from trainer.images import DEFAULT_MAX_IMAGE_PIXELS, decode_image

# CLIP's zero-shot prompts ("a photo of a {}.", Radford et al. 2021, the ImageNet template most
# used on its own).
PROMPT_TEMPLATE = "a photo of a {}."
# Prompts for images with nobody in them; the "no person" side of the margin rule.
NO_PERSON_PROMPTS = ("a photo with no people.", "a photo of an empty room.",
                     "a photo of an object.", "a photo of an animal.", "a photo of food.",
                     "a photo of a landscape.")
# A value is present when its prompt beats every no-person prompt by this cosine margin.
# 0 means "more like a person than like no person"; raise it for fewer, surer annotations.
DEFAULT_PERSON_MARGIN = 0.0
# A second value (a man *and* a woman) is present too when its similarity is within this cosine
# margin of the best value.
DEFAULT_OVERLAP_MARGIN = 0.01
# Concepts: at most this many per image, and only those with this softmax probability over the
# concept prompts (at CLIP's logit scale, about 100) -- 0.2 keeps only clear winners.
DEFAULT_CONCEPT_TOP_K = 3
DEFAULT_CONCEPT_MIN_PROBABILITY = 0.2
DEFAULT_BATCH_SIZE = 32
TEXT_ENCODE_BATCH = 256


@dataclasses.dataclass(frozen=True)
class ZeroShotConfig:
    architecture: str
    checkpoint: str = None       # state dict file, loaded with torch.load(weights_only=True)
    model_config: str = None     # open_clip model config JSON, registered under its file stem
    person_margin: float = DEFAULT_PERSON_MARGIN
    overlap_margin: float = DEFAULT_OVERLAP_MARGIN
    concept_top_k: int = DEFAULT_CONCEPT_TOP_K
    concept_min_probability: float = DEFAULT_CONCEPT_MIN_PROBABILITY
    batch_size: int = DEFAULT_BATCH_SIZE
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    torch_threads: int = 0       # 0: torch's default
    # prompts.npz from `balancebeam embed-prompts`: score embeddings, no model
    prompt_embeddings: str = None


def _read_bytes(path):
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path, compression_type="uncompressed") as handle:
        return handle.read()


def checkpoint_state_dict(state, config):
    """The model weights in a loaded checkpoint: a plain state dict, {"state_dict": ...}
    (open_clip's trainer) or a `balancebeam train` checkpoint ({"model": ..., "model_name": ...}).
    """
    if isinstance(state, dict) and "state_dict" in state:
        return state["state_dict"]
    if isinstance(state, dict) and "model" in state and "model_name" in state:
        if state["model_name"] != config.architecture:
            raise ValueError(f"{config.checkpoint} holds a {state['model_name']!r} model, "
                             f"but --image-model is {config.architecture!r}")
        return state["model"]
    return state


def load_model(config):
    """(model, preprocess, tokenizer) in eval mode; never downloads, never unpickles objects."""
    import open_clip
    import torch

    if config.model_config:
        name = os.path.splitext(os.path.basename(config.model_config))[0]
        if name != config.architecture:
            raise ValueError(f"model config {config.model_config} registers {name!r}, "
                             f"but the architecture is {config.architecture!r}")
        with tempfile.TemporaryDirectory() as folder:
            local = os.path.join(folder, name + ".json")
            with open(local, "wb") as handle:
                handle.write(_read_bytes(config.model_config))
            json.loads(open(local, encoding="utf-8").read())  # a clear error if it is not JSON
            open_clip.add_model_config(local)
    elif config.architecture not in open_clip.list_models():
        # balancebeam's own configs (bb-tiny-vit, ...)
        from trainer.model_configs import register_model_configs

        register_model_configs()
    model, _, preprocess = open_clip.create_model_and_transforms(config.architecture,
                                                                 pretrained=None)
    if config.checkpoint:
        state = torch.load(io.BytesIO(_read_bytes(config.checkpoint)), map_location="cpu",
                           weights_only=True)
        from trainer.model_configs import strip_ddp_prefix

        model.load_state_dict(strip_ddp_prefix(checkpoint_state_dict(state, config)))
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(config.architecture)


class ZeroShotImageAnnotator:
    """Scores images (or precomputed image embeddings) against attribute and concept prompts.

    `groups`: {group: values}, e.g. {"perceived_gender": ("man", "woman")}; `concepts`: names.
    Picklable: the model is loaded on first use in each worker.
    """

    def __init__(self, config, groups, concepts):
        self.config = config
        self.groups = {group: tuple(values) for group, values in groups.items()}
        self.concepts = tuple(concepts)
        self._state = None

    def __getstate__(self):
        return {**self.__dict__, "_state": None}

    @property
    def embed_dim(self):
        return self._loaded()["no_person"].shape[1]

    def _loaded(self):
        if self._state is None and self.config.prompt_embeddings:
            self._state = load_prompt_embeddings(self.config.prompt_embeddings, self.groups,
                                                 self.concepts)
        if self._state is None:
            import torch

            if self.config.torch_threads:
                torch.set_num_threads(self.config.torch_threads)
            model, preprocess, tokenizer = load_model(self.config)
            encode = lambda prompts: self._encode_text(model, tokenizer, prompts)
            self._state = {
                "model": model, "preprocess": preprocess,
                "logit_scale": float(model.logit_scale.detach().exp()),
                "groups": {group: encode([PROMPT_TEMPLATE.format(v) for v in values])
                           for group, values in self.groups.items()},
                "no_person": encode(list(NO_PERSON_PROMPTS)),
                "concepts": encode([PROMPT_TEMPLATE.format(c) for c in self.concepts])
                if self.concepts else None,
            }
        return self._state

    @staticmethod
    def _encode_text(model, tokenizer, prompts):
        import torch

        chunks = []
        with torch.no_grad():
            for start in range(0, len(prompts), TEXT_ENCODE_BATCH):
                tokens = tokenizer(prompts[start:start + TEXT_ENCODE_BATCH])
                chunks.append(model.encode_text(tokens, normalize=True).float().numpy())
        return np.concatenate(chunks)

    def prompt_arrays(self) -> dict:
        """The prompts' embeddings and names as plain arrays: what prompts.npz holds."""
        state = self._loaded()
        concepts = state["concepts"]
        arrays = {"logit_scale": np.float32(state["logit_scale"]), "no_person": state["no_person"],
                  "group_names": np.array(list(self.groups), dtype=str),
                  "concept_names": np.array(self.concepts, dtype=str),
                  "concepts": concepts if concepts is not None else np.zeros((0, self.embed_dim))}
        for index, (group, values) in enumerate(self.groups.items()):
            arrays[f"group_{index}"] = state["groups"][group]
            arrays[f"group_{index}_values"] = np.array(values, dtype=str)
        return arrays

    def embed_images(self, images_bytes):
        """Normalised image embeddings (batch, dim) of encoded images, in one forward pass."""
        import torch

        state = self._loaded()
        if "model" not in state:
            raise ValueError(
                "this annotator scores precomputed embeddings only (--prompt-embeddings); the "
                "sample has an image but no embedding: pass --embeddings-field, or --image-model")
        pixels = torch.stack([state["preprocess"](decode_image(data, self.config.max_image_pixels))
                              for data in images_bytes])
        with torch.no_grad():
            return state["model"].encode_image(pixels, normalize=True).float().numpy()

    def annotate_embeddings(self, embeddings, person_visible=None):
        """[(attributes, concepts, scores)] per row of `embeddings` (batch, dim).

        person_visible: per row True / False / None; where given (e.g. from DataComp's face_bboxes),
        it decides whether anybody is shown instead of the prompts' margin rule.
        """
        state = self._loaded()
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or embeddings.shape[1] != state["no_person"].shape[1]:
            raise ValueError(f"embeddings of shape {embeddings.shape}, model wants "
                             f"(batch, {state['no_person'].shape[1]})")
        norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
        embeddings = embeddings / np.where(norms > 0, norms, 1.0)
        no_person = (embeddings @ state["no_person"].T).max(axis=1)
        results = [([], [], {}) for _ in range(len(embeddings))]
        stated = None
        if person_visible is not None:
            person_visible = list(person_visible)
            stated = np.array([visible is not None for visible in person_visible], dtype=bool)
            said = np.array([bool(visible) for visible in person_visible], dtype=bool)
        # Whole-batch array work; Python touches only the labels given (most rows get one or none).
        for group, values in self.groups.items():
            similarity = embeddings @ state["groups"][group].T
            logits = state["logit_scale"] * np.concatenate([similarity, no_person[:, None]], axis=1)
            probability = _softmax(logits)
            best = similarity.max(axis=1)
            visible = best - no_person >= self.config.person_margin  # the margin rule
            if stated is not None:
                visible = np.where(stated, said, visible)
            chosen = (best[:, None] - similarity <= self.config.overlap_margin) & visible[:, None]
            labels = [f"{group}:{value}" for value in values]
            rows, indices = np.nonzero(chosen)  # row by row, values in order
            for row, index, score in zip(rows.tolist(), indices.tolist(),
                                         probability[rows, indices].tolist()):
                attributes, _, scores = results[row]
                attributes.append(labels[index])
                scores[labels[index]] = round(score, 4)
        if state["concepts"] is not None and self.config.concept_top_k > 0:
            probability = _softmax(state["logit_scale"] * (embeddings @ state["concepts"].T))
            for row, index in _top_concepts(probability, self.config.concept_top_k,
                                            self.config.concept_min_probability):
                results[row][1].append(self.concepts[index])
        return results

    def annotate_images(self, images_bytes):
        return self.annotate_embeddings(self.embed_images(images_bytes))


def load_prompt_embeddings(path: str, groups: dict, concepts: tuple) -> dict:
    """prompts.npz -> the annotator's scoring state; its groups, values and concepts must be the
    lexicon's."""
    with np.load(io.BytesIO(_read_bytes(path)), allow_pickle=False) as stored:
        arrays = {name: stored[name] for name in stored.files}
    found_groups = {str(name): tuple(str(v) for v in arrays[f"group_{i}_values"])
                    for i, name in enumerate(arrays["group_names"])}
    found_concepts = tuple(str(c) for c in arrays["concept_names"])
    if found_groups != dict(groups) or found_concepts != tuple(concepts):
        raise ValueError(
            f"{path} was made for other labels ({len(found_groups)} groups, {len(found_concepts)} "
            f"concepts) than this lexicon's ({len(groups)} groups, {len(concepts)} concepts): run "
            "`balancebeam embed-prompts` again with the same --lexicon")
    return {
        "logit_scale": float(arrays["logit_scale"]),
        "no_person": arrays["no_person"].astype(np.float32),
        "groups": {
            group: arrays[f"group_{i}"].astype(np.float32) for i, group in enumerate(found_groups)
        },
        "concepts": arrays["concepts"].astype(np.float32) if len(found_concepts) else None,
    }


def _top_concepts(probability, k, floor):
    """(row, concept index) of each row's k most probable concepts with probability >= floor, in
    decreasing probability (ties: lower index first), as a stable argsort of -probability gives
    them.

    With floor > 0 only the concepts at or above it are sorted: they are a prefix of that order.
    """
    if floor <= 0:
        top = np.argsort(-probability, axis=1, kind="stable")[:, :k]
        return [
            (row, int(index))
            for row in range(len(top))
            for index in top[row]
            if probability[row, index] >= floor
        ]
    rows, indices = np.nonzero(probability >= floor)
    order = np.lexsort((indices, -probability[rows, indices], rows))
    found, taken, previous = [], 0, -1
    for row, index in zip(rows[order].tolist(), indices[order].tolist()):
        taken = taken + 1 if row == previous else 1
        previous = row
        if taken <= k:
            found.append((row, index))
    return found


def _softmax(logits):
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)
