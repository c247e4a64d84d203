"""Mean Teacher cost terms and ramps, with the reference code's exact normalisation.

Each loss returns a SUM over its rows; `mean_teacher_loss` divides every term by the whole minibatch
(labeled + unlabeled rows), in float32 whatever the logits' dtype (docs/design.md: training).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from mt_scale.config import MeanTeacherConfig

NO_LABEL = -1  # label of unlabeled rows in every batch (pipelines put them after the L labeled rows)


def softmax_mse_loss(input_logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """Sum over rows of the squared distance between the two softmaxes, divided by the class count.

    Gradients reach `input_logits` only: the target is detached.
    """
    _check_same_shape(input_logits, target_logits)
    input_probs = F.softmax(input_logits.float(), dim=1)
    target_probs = F.softmax(target_logits.detach().float(), dim=1)
    return F.mse_loss(input_probs, target_probs, reduction="sum") / input_logits.shape[1]


def softmax_kl_loss(input_logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """Sum over rows of KL(softmax(target) || softmax(input)); gradients reach `input_logits` only.

    Both sides go through log_softmax (log_target=True), so a target probability that underflows to
    zero contributes exactly 0 instead of 0 * log 0 = NaN.
    """
    _check_same_shape(input_logits, target_logits)
    input_log_probs = F.log_softmax(input_logits.float(), dim=1)
    target_log_probs = F.log_softmax(target_logits.detach().float(), dim=1)
    return F.kl_div(input_log_probs, target_log_probs, reduction="sum", log_target=True)


def symmetric_mse_loss(input1: torch.Tensor, input2: torch.Tensor) -> torch.Tensor:
    """Sum of squared logit differences divided by the class count; gradients reach both inputs."""
    _check_same_shape(input1, input2)
    return torch.sum((input1.float() - input2.float()) ** 2) / input1.shape[1]


def class_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of cross-entropy over labeled rows (label -1 ignored); exactly 0 when no row is labeled."""
    return F.cross_entropy(logits.float(), labels, ignore_index=NO_LABEL, reduction="sum")


CONSISTENCY_LOSSES = {"mse": softmax_mse_loss, "kl": softmax_kl_loss}
# The keys of `mean_teacher_loss`'s result, in the order the metrics log shows them.
LOSS_NAMES = ("total", "class", "consistency", "logit_distance", "teacher_class")


def mean_teacher_loss(
    student_out: tuple[torch.Tensor, torch.Tensor],
    teacher_out: tuple[torch.Tensor, torch.Tensor] | None,
    labels: torch.Tensor,
    *,
    consistency_weight: float | torch.Tensor,
    consistency: str = "mse",
    logit_distance_cost: float = 0.0,
) -> dict[str, torch.Tensor]:
    """The reference's total cost for one minibatch, each term divided by the minibatch size.

    `student_out`/`teacher_out` are the models' (class_logits, consistency_logits) pairs (equal
    tensors for a single-head model). As in the reference, the student's class head takes the
    cross-entropy, its consistency head is pulled towards the teacher's CLASS head, and the two
    student heads are tied by `logit_distance_cost` * symmetric MSE (zero for a single head).
    Returns LOSS_NAMES: total (the one to backpropagate), class, consistency, logit_distance, and
    teacher_class (the teacher's classification cost, for logging only). With `teacher_out` None (no
    teacher: a plain supervised step) the consistency and teacher_class terms are 0.
    """
    if consistency not in CONSISTENCY_LOSSES:
        raise ValueError(f"consistency={consistency!r}: choose one of {sorted(CONSISTENCY_LOSSES)}")
    class_logits, consistency_logits = student_out
    teacher_logits = teacher_out[0].detach() if teacher_out is not None else None
    minibatch_size = labels.shape[0]

    class_term = class_loss(class_logits, labels) / minibatch_size
    zero = class_term.new_zeros(())
    # a weight on the device (a CUDA graph's) always takes the term; a float of 0 skips it
    weighted = isinstance(consistency_weight, torch.Tensor) or consistency_weight != 0
    if weighted and teacher_logits is not None:
        consistency_term = (
            consistency_weight
            * CONSISTENCY_LOSSES[consistency](consistency_logits, teacher_logits)
            / minibatch_size
        )
    else:
        consistency_term = zero
    if logit_distance_cost and consistency_logits is not class_logits:
        logit_distance = (
            logit_distance_cost * symmetric_mse_loss(class_logits, consistency_logits) / minibatch_size
        )
    else:
        logit_distance = zero
    if teacher_logits is not None:
        with torch.no_grad():
            teacher_class = class_loss(teacher_logits, labels) / minibatch_size
    else:
        teacher_class = zero
    return {
        "total": class_term + consistency_term + logit_distance,
        "class": class_term,
        "consistency": consistency_term,
        "logit_distance": logit_distance,
        "teacher_class": teacher_class,
    }


def sigmoid_rampup(current: float, rampup_length: float) -> float:
    """exp(-5 (1 - t)^2) with t = current / rampup_length clipped to [0, 1]; 1 when the length is 0."""
    if rampup_length == 0:
        return 1.0
    phase = 1.0 - min(max(current, 0.0), rampup_length) / rampup_length
    return float(math.exp(-5.0 * phase * phase))


def linear_rampup(current: float, rampup_length: float) -> float:
    """current / rampup_length, capped at 1 (1 at once when the length is 0)."""
    if current < 0 or rampup_length < 0:
        raise ValueError(f"linear_rampup needs current >= 0 and length >= 0, got {current}, {rampup_length}")
    if current >= rampup_length:
        return 1.0
    return current / rampup_length


def cosine_rampdown(current: float, rampdown_length: float) -> float:
    """0.5 (cos(pi t) + 1) with t = current / rampdown_length, one half cycle from 1 to 0.

    The reference asserts 0 <= current <= length; here current is clipped so a last fractional
    step can never produce a rising LR. The config check makes rampdown length >= epochs.
    """
    current = min(max(current, 0.0), rampdown_length)
    return float(0.5 * (math.cos(math.pi * current / rampdown_length) + 1.0))


def consistency_weight(mt: MeanTeacherConfig, epoch: float) -> float:
    """Consistency cost weight at `epoch`: weight * sigmoid_rampup(epoch, rampup epochs).

    The reference evaluates the ramp at the integer epoch (it changes once per epoch); with
    `mt.consistency_rampup_per_step` the fractional epoch is used instead. 0 when MT is disabled.
    """
    if not mt.enabled:
        return 0.0
    position = epoch if mt.consistency_rampup_per_step else math.floor(epoch)
    return mt.consistency_weight * sigmoid_rampup(position, mt.consistency_rampup_epochs)


def _check_same_shape(first: torch.Tensor, second: torch.Tensor) -> None:
    if first.shape != second.shape:
        raise ValueError(f"logit shapes differ: {tuple(first.shape)} vs {tuple(second.shape)}")
