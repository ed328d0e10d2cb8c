"""balancebeam's model configs for open_clip, and the checkpoint key convention.

Shared by the trainer (trainer/models.py) and the zero-shot image annotator
(pipeline/annotators/image.py), which needs them without the trainer: nothing heavy is imported
here, open_clip only when the configs are registered.
"""
from pathlib import Path

# JSON model configs shipped with the package (open_clip's format): once registered,
# `open_clip.create_model("bb-tiny-vit")` works like any built-in architecture.
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
# The default model: trains on a CPU in about a minute on 32 px synthetic shards.
DEFAULT_MODEL = "bb-tiny-vit"

_registered = False


def register_model_configs() -> None:
    """Add CONFIG_DIR's configs to open_clip's model registry (idempotent)."""
    global _registered
    if not _registered:
        import open_clip

        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


def strip_ddp_prefix(state_dict: dict) -> dict:
    """Remove DistributedDataParallel's 'module.' prefix so single-process models load the weights.
    """
    return {key[len("module."):] if key.startswith("module.") else key: value
            for key, value in state_dict.items()}
