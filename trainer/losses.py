"""Contrastive losses with optional per-sample weights (from `balance.weight` in the shards).

Built on open_clip's ClipLoss and SigLipLoss: with all weights equal they compute exactly those
losses.
"""
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss


class WeightedClipLoss(ClipLoss):
    """CLIP softmax loss where image i's and caption i's cross-entropy terms count w_i times.

    The loss is sum_i w_i (CE_image->text_i + CE_text->image_i) / 2 / sum_i w_i; negatives are not
    reweighted. Under DDP it uses local_loss (rows are this rank's samples, as the weights are).
    """

    def __init__(self, rank=0, world_size=1):
        super().__init__(local_loss=world_size > 1, gather_with_grad=world_size > 1,
                         cache_labels=True, rank=rank, world_size=world_size)

    def forward(self, image_features, text_features, logit_scale, weights=None, logit_bias=None):
        logits_per_image, logits_per_text = self.get_logits(image_features, text_features,
                                                            logit_scale, logit_bias)
        labels = self.get_ground_truth(image_features.device, logits_per_image.shape[0])
        per_sample = (F.cross_entropy(logits_per_image, labels, reduction="none")
                      + F.cross_entropy(logits_per_text, labels, reduction="none")) / 2
        if weights is None:
            return per_sample.mean()
        weights = weights.to(per_sample.dtype)
        return (weights * per_sample).sum() / weights.sum().clamp_min(
            torch.finfo(per_sample.dtype).tiny)


class WeightedSigLipLoss(SigLipLoss):
    """SigLIP sigmoid loss where image i's row of pair terms counts w_i times (mean weight 1)."""

    def __init__(self, rank=0, world_size=1):
        super().__init__(rank=rank, world_size=world_size)
        self._weights = None

    def forward(self, image_features, text_features, logit_scale, weights=None, logit_bias=None):
        if logit_bias is None:
            raise ValueError(
                "the SigLIP loss needs a model with a logit_bias (init_logit_bias in its config)")
        self._weights = weights
        try:
            return super().forward(image_features, text_features, logit_scale, logit_bias)
        finally:
            self._weights = None

    def _loss(self, image_features, text_features, logit_scale, logit_bias=None,
              negative_only=False):
        if self._weights is None:
            return super()._loss(image_features, text_features, logit_scale, logit_bias,
                                 negative_only)
        logits = self.get_logits(image_features, text_features, logit_scale, logit_bias)
        labels = self.get_ground_truth(image_features.device, image_features.dtype,
                                       image_features.shape[0], negative_only=negative_only)
        per_image = -F.logsigmoid(labels * logits).sum(dim=1)
        weights = self._weights.to(per_image.dtype)
        return (weights * per_image).sum() / weights.sum().clamp_min(
            torch.finfo(per_image.dtype).tiny)


LOSSES = {"clip": WeightedClipLoss, "siglip": WeightedSigLipLoss}


def make_loss(name: str, rank=0, world_size=1):
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose from {', '.join(LOSSES)}")
    return LOSSES[name](rank=rank, world_size=world_size)
