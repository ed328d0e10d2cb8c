"""Model construction for the trainer and evaluator: open_clip architectures plus our tiny configs.

Models are created with random weights (pretrained=None); checkpoints load with weights_only=True.
"""
import logging

import open_clip
import torch

# The configs and the checkpoint key convention live in trainer/model_configs.py (the image
# annotator uses them without the trainer); re-exported here for the trainer's callers.
from trainer.model_configs import DEFAULT_MODEL, register_model_configs, strip_ddp_prefix

__all__ = [
    "DEFAULT_MODEL", "create_model", "load_checkpoint", "read_checkpoint", "register_model_configs",
    "strip_ddp_prefix"
]

log = logging.getLogger(__name__)

# open_clip warns on the root logger whenever pretrained=None; here random initial weights are the
# intent (and load_checkpoint overwrites them), so that line would only mislead.
RANDOM_INIT_WARNING = "No pretrained weights loaded for model"


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(RANDOM_INIT_WARNING)


register_model_configs()


def create_model(model_name: str = DEFAULT_MODEL, device="cpu"):
    """Return (model, tokenizer, train_preprocess, eval_preprocess) for an open_clip architecture.

    Weights are random: no model zoo is contacted. Use load_checkpoint to load trained weights.
    """
    if model_name not in open_clip.list_models():
        raise ValueError(
            f"unknown model {model_name!r}; known: {', '.join(open_clip.list_models())}")
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
