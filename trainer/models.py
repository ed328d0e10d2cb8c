"""Model construction for the trainer and evaluator: open_clip architectures plus our tiny configs.

Models are created with random weights (pretrained=None); checkpoints load with weights_only=True.
"""
import logging
from pathlib import Path

import open_clip
import torch

log = logging.getLogger(__name__)

# JSON model configs shipped with the package (open_clip's format), registered on import so that
# `open_clip.create_model("bb-tiny-vit")` works like any built-in architecture.
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
# The default model: trains on a CPU in about a minute on 32 px synthetic shards.
DEFAULT_MODEL = "bb-tiny-vit"

_registered = False
# open_clip warns on the root logger whenever pretrained=None; here random initial weights are the
# intent (and load_checkpoint overwrites them), so that line would only mislead.
RANDOM_INIT_WARNING = "No pretrained weights loaded for model"


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(RANDOM_INIT_WARNING)


def register_model_configs() -> None:
    """Add trainer/configs/*.json to open_clip's model registry (idempotent)."""
    global _registered
    if not _registered:
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


register_model_configs()


def create_model(model_name: str = DEFAULT_MODEL, device="cpu"):
    """Return (model, tokenizer, train_preprocess, eval_preprocess) for an open_clip architecture.

    Weights are random: no model zoo is contacted. Use load_checkpoint to load trained weights.
    """
    if model_name not in open_clip.list_models():
        raise ValueError(f"unknown model {model_name!r}; known: {', '.join(open_clip.list_models())}")
    root, quiet = logging.getLogger(), _DropRandomInitWarning()
    root.addFilter(quiet)
    try:
        model, train_preprocess, eval_preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=None, device=device, output_dict=True
        )
    finally:
        root.removeFilter(quiet)
    tokenizer = open_clip.get_tokenizer(model_name)
    return model, tokenizer, train_preprocess, eval_preprocess


def read_checkpoint(path) -> dict:
    """Read a checkpoint written by trainer.train (plain tensors and dicts only)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise ValueError(f"{path} is not a balancebeam checkpoint (no 'model' entry)")
    return checkpoint


def load_checkpoint(path, device="cpu"):
    """Create the checkpoint's architecture and load its weights.

    Returns (model, tokenizer, eval_preprocess, checkpoint dict). The model is in eval mode.
    """
    checkpoint = read_checkpoint(path)
    model_name = checkpoint.get("model_name")
    if not model_name:
        raise ValueError(f"{path} does not record its model_name")
    model, tokenizer, _, eval_preprocess = create_model(model_name, device=device)
    model.load_state_dict(strip_ddp_prefix(checkpoint["model"]))
    model.eval()
    return model, tokenizer, eval_preprocess, checkpoint


def strip_ddp_prefix(state_dict: dict) -> dict:
    """Remove DistributedDataParallel's 'module.' prefix so single-process models load the weights."""
    return {key[len("module."):] if key.startswith("module.") else key: value
            for key, value in state_dict.items()}
