"""Validation: top-1/top-5 error and mean cross-entropy of a model over the val split, across ranks.

Each rank scores its part of the split (padding rows masked) and one all-reduce sums the counts.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from accelerate import Accelerator

# The scores `evaluate` returns besides "count", in the order the metrics log shows them.
SCORE_NAMES = ("top1_error", "top5_error", "loss")


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    """For each k, how many rows have their label among the k highest logits (k capped at classes)."""
    max_k = min(max(ks), logits.shape[1])
    top = logits.topk(max_k, dim=1).indices
    hits = top.eq(labels.view(-1, 1))
    return [int(hits[:, : min(k, max_k)].any(dim=1).sum()) for k in ks]


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: Iterable[dict],
    accelerator: Accelerator,
    *,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    channels_last: bool = False,
) -> dict[str, float]:
    """Error rates of `model`'s class head on `batches`, summed over all ranks.

    Returns top1_error, top5_error (fractions), loss (mean cross-entropy) and count (samples seen
    by all ranks together). The model runs in eval mode (BatchNorm running statistics) and is put
    back in its previous mode afterwards. Must be called on every rank (it all-reduces once).
    """
    from pipelines import normalize

    was_training = model.training
    model.eval()
    device = accelerator.device
    # float64 sums stay exact for any realistic val split size.
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    try:
        for batch in batches:
            images = batch["image"].to(device, non_blocking=True)
            labels = batch["label"].to(device, non_blocking=True)
            valid = batch.get("valid")
            if valid is not None:
                valid = valid.to(device).bool()
                images, labels = images[valid], labels[valid]
            if labels.numel() == 0:
                continue
            inputs = normalize(images, mean, std, channels_last=channels_last)
            with accelerator.autocast():
                logits = model(inputs)[0]
            logits = logits.float()
            top1, top5 = topk_correct(logits, labels)
            loss = F.cross_entropy(logits, labels, reduction="sum")
            totals += torch.tensor(
                [top1, top5, float(loss), labels.numel()], dtype=torch.float64, device=device
            )
    finally:
        model.train(was_training)
    totals = accelerator.reduce(totals, reduction="sum")
    top1, top5, loss_sum, count = (float(value) for value in totals.tolist())
    if count == 0:
        return {"top1_error": float("nan"), "top5_error": float("nan"), "loss": float("nan"), "count": 0}
    return {
        "top1_error": 1.0 - top1 / count,
        "top5_error": 1.0 - top5 / count,
        "loss": loss_sum / count,
        "count": int(count),
    }
