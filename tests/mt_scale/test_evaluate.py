"""Evaluation counts: top-k hits derived by hand, padding rows ignored, every sample counted once."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from mt_scale.evaluate import evaluate, topk_correct


class FixedLogits(torch.nn.Module):
    """Returns the logits stored for each image, keyed by the image's first pixel value."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # normalize(mean=0, std=1) maps uint8 v to v / 255; recover the row index from pixel (0, 0, 0)
        index = torch.round(images[:, 0, 0, 0] * 255).long()
        logits = self.table[index] * self.scale
        return logits, logits


def test_topk_correct_by_hand() -> None:
    logits = torch.tensor(
        [
            [0.1, 0.9, 0.0, 0.0, 0.0, 0.0],  # label 1: top-1 hit
            [0.9, 0.1, 0.8, 0.7, 0.6, 0.5],  # label 1: 6th of 6, misses top-5
            [0.0, 0.2, 0.9, 0.3, 0.0, 0.0],  # label 3: second, top-5 hit only
        ]
    )
    labels = torch.tensor([1, 1, 3])
    assert topk_correct(logits, labels) == [1, 2]
    # fewer classes than k: top-5 over 3 classes counts every row
    assert topk_correct(logits[:, :3], torch.tensor([0, 1, 2]), ks=(1, 5)) == [1, 3]  # only row 2 (0.9 on class 2) is a top-1 hit


def test_evaluate_counts_valid_rows_once() -> None:
    accelerator = Accelerator(cpu=True)
    num_classes = 10
    # Row i ranks class (i + k) % 10 k-th (logit 5 - k): a label is top-1 iff k == 0, top-5 iff k < 5.
    table = torch.zeros(12, num_classes)
    for i in range(12):
        for k in range(num_classes):
            table[i, (i + k) % num_classes] = 5.0 - k
    model = FixedLogits(table)
    labels = torch.tensor([0, 1, 9, 4, 5, 0, 7, 8, 8, 0, 3, 2])
    # k per valid row: 0, 0, 7, 1, 1, 5, 1, 1, 0, 1 -> top-1 hits rows 0, 1, 8; top-5 adds 3, 4, 6, 7, 9
    # rows 10 and 11 are padding in the last batch (valid False): never counted
    images = torch.zeros(12, 3, 2, 2, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(12, dtype=torch.uint8)
    valid = torch.ones(12, dtype=torch.bool)
    valid[10:] = False
    batches = [
        {"image": images[:6], "label": labels[:6], "valid": valid[:6]},
        {"image": images[6:], "label": torch.cat([labels[6:10], torch.tensor([-1, -1])]), "valid": valid[6:]},
        {"image": images[:4], "label": torch.full((4,), -1), "valid": torch.zeros(4, dtype=torch.bool)},
    ]
    model.train()
    result = evaluate(model, batches, accelerator, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    assert result["count"] == 10
    assert result["top1_error"] == pytest.approx(1 - 3 / 10)
    assert result["top5_error"] == pytest.approx(1 - 8 / 10)
    expected_loss = torch.nn.functional.cross_entropy(table[:10], labels[:10]).item()
    assert result["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert model.training  # mode restored
