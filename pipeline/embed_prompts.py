"""`balancebeam embed-prompts`: the zero-shot prompts' embeddings, computed once, for a pool with
image embeddings.

A DataComp pool ships CLIP image embeddings per row (`l14_img` in its .npz files). Annotating it
needs only the text side: the attribute, no-person and concept prompts, embedded by the same
model. This writes them to one .npz file (plain arrays, no pickles), and `annotate
--prompt-embeddings prompts.npz --embeddings-field l14_img` scores every row with a matrix
product, with no model in the workers.
"""
from __future__ import annotations

import argparse
import io
import logging

import numpy as np

from pipeline.annotators.lexicon import Lexicon
from pipeline.errors import UsageError
from pipeline.files import write_bytes_atomically

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="balancebeam embed-prompts", description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog="examples:\n"
        "  balancebeam embed-prompts --image-model ViT-L-14 --image-checkpoint l14.pt --output "
        "prompts.npz\n"
    )
    parser.add_argument("--image-model", required=True,
                        help="open_clip architecture of the pool's embeddings")
    parser.add_argument("--image-checkpoint",
                        help="state-dict file (torch.load with weights_only=True)")
    parser.add_argument("--image-model-config",
                        help="open_clip model config JSON for a custom architecture")
    parser.add_argument(
        "--lexicon", action="append", default=None,
        help="lexicon file or directory (repeatable); default: the bundled ones. annotate must "
        "use the same")
    parser.add_argument("--output", required=True, help="the .npz file to write")
    return parser


def embed_prompts(architecture: str, output: str, checkpoint: str | None = None,
                  model_config: str | None = None, lexicons=None) -> dict:
    """Embed the lexicon's prompts with the model and write them to `output`; returns the arrays."""
    from pipeline.annotators.image import ZeroShotConfig, ZeroShotImageAnnotator

    lexicon = Lexicon.load(lexicons)
    annotator = ZeroShotImageAnnotator(
        ZeroShotConfig(architecture=architecture, checkpoint=checkpoint, model_config=model_config),
        lexicon.groups, lexicon.concepts)
    arrays = annotator.prompt_arrays()
    sink = io.BytesIO()
    np.savez(sink, **arrays)
    write_bytes_atomically(output, sink.getvalue())
    log.info(
        "embedded %d attribute, %d no-person and %d concept prompts (dimension %d) with %s; wrote "
        "%s",
        sum(len(v) for v in lexicon.groups.values()), len(arrays["no_person"]),
        len(lexicon.concepts), arrays["no_person"].shape[1], architecture, output)
    return arrays


def run(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not args.output.endswith(".npz"):
        raise UsageError(f"--output must name a .npz file, got {args.output!r}")
    embed_prompts(
        args.image_model, args.output, args.image_checkpoint, args.image_model_config, args.lexicon
    )
    return 0
