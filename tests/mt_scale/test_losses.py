"""Losses, ramps and schedules against values derived by hand from the formulas."""

import math

import pytest
import torch

from mt_scale.config import MeanTeacherConfig, OptimConfig, load_config
from mt_scale.losses import (
    class_loss,
    consistency_weight,
    cosine_rampdown,
    linear_rampup,
    mean_teacher_loss,
    sigmoid_rampup,
    softmax_kl_loss,
    softmax_mse_loss,
    symmetric_mse_loss,
)
from mt_scale.optim import learning_rate

LN3 = math.log(3.0)


def test_softmax_mse_sums_rows_and_divides_by_class_count():
    # softmax([0, ln 3]) = [1/4, 3/4]; softmax([0, 0]) = [1/2, 1/2]: squared distance 2 * (1/4)^2 = 1/8
    student = torch.tensor([[0.0, LN3], [0.0, 0.0]])
    teacher = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    assert softmax_mse_loss(student, teacher).item() == pytest.approx((1 / 8 + 0.0) / 2)


def test_softmax_kl_is_kl_of_teacher_from_student():
    student = torch.tensor([[0.0, LN3]])  # q = [1/4, 3/4]
    teacher = torch.tensor([[0.0, 0.0]])  # p = [1/2, 1/2]
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert softmax_kl_loss(student, teacher).item() == pytest.approx(expected, rel=1e-6)
    assert softmax_kl_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)


def test_consistency_gradients_reach_the_student_only():
    student = torch.tensor([[0.0, LN3, 1.0]], requires_grad=True)
    teacher = torch.tensor([[2.0, 0.0, -1.0]], requires_grad=True)
    for loss_fn in (softmax_mse_loss, softmax_kl_loss):
        student.grad = None
        loss_fn(student, teacher).backward()
        assert teacher.grad is None
        assert student.grad.abs().sum() > 0


def test_large_logits_stay_finite():
    student = torch.tensor([[1000.0, 0.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, 1000.0]])
    # probabilities [1, 0] vs [0, 1]: squared distance 2, over 2 classes
    assert softmax_mse_loss(student, teacher).item() == pytest.approx(1.0)
    kl = softmax_kl_loss(student, teacher)  # p = [0, 1], log q = [0, -1000]: KL = 1000
    assert kl.item() == pytest.approx(1000.0)
    kl.backward()
    assert torch.isfinite(student.grad).all()
    labels = torch.tensor([1])
    assert class_loss(student, labels).item() == pytest.approx(1000.0)


def test_one_class_gives_zero_costs():
    logits = torch.tensor([[3.0], [-2.0]])
    assert softmax_mse_loss(logits, logits * 5).item() == 0.0
    assert softmax_kl_loss(logits, logits * 5).item() == 0.0
    assert class_loss(logits, torch.tensor([0, -1])).item() == 0.0


def test_symmetric_mse_sends_gradients_both_ways():
    first = torch.tensor([[1.0, 2.0, 3.0]], requires_grad=True)
    second = torch.tensor([[1.0, 0.0, 6.0]], requires_grad=True)
    loss = symmetric_mse_loss(first, second)
    assert loss.item() == pytest.approx((0 + 4 + 9) / 3)
    loss.backward()
    assert torch.allclose(first.grad, torch.tensor([[0.0, 4.0, -6.0]]) / 3)
    assert torch.allclose(second.grad, -first.grad)


def test_class_loss_sums_labeled_rows_and_is_zero_without_labels():
    logits = torch.tensor([[0.0, LN3], [0.0, 0.0], [5.0, 1.0]], requires_grad=True)
    labels = torch.tensor([1, 0, -1])
    assert class_loss(logits, labels).item() == pytest.approx(-math.log(0.75) - math.log(0.5))
    none_labeled = class_loss(logits, torch.tensor([-1, -1, -1]))
    assert none_labeled.item() == 0.0
    none_labeled.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_bf16_logits_give_float32_costs_equal_to_float32_math():
    torch.manual_seed(0)
    student = torch.randn(6, 5).bfloat16()
    teacher = torch.randn(6, 5).bfloat16()
    for loss_fn in (softmax_mse_loss, softmax_kl_loss, symmetric_mse_loss):
        low = loss_fn(student, teacher)
        assert low.dtype == torch.float32
        assert low.item() == pytest.approx(loss_fn(student.float(), teacher.float()).item(), rel=1e-6)


def test_mean_teacher_loss_divides_every_term_by_the_whole_minibatch():
    class_logits = torch.tensor([[0.0, LN3], [0.0, 0.0], [1.0, 1.0], [2.0, 0.0]], requires_grad=True)
    consistency_logits = torch.tensor([[0.0, 0.0], [0.0, LN3], [1.0, 1.0], [0.0, 0.0]], requires_grad=True)
    teacher_logits = torch.zeros(4, 2, requires_grad=True)
    labels = torch.tensor([1, 0, -1, -1])
    terms = mean_teacher_loss(
        (class_logits, consistency_logits),
        (teacher_logits, teacher_logits),
        labels,
        consistency_weight=8.0,
        consistency="mse",
        logit_distance_cost=0.5,
    )
    expected_class = (-math.log(0.75) - math.log(0.5)) / 4
    # consistency rows: [1/2,1/2] vs [1/2,1/2] -> 0; [1/4,3/4] -> 1/8 / 2; others 0
    expected_consistency = 8.0 * (1 / 16) / 4
    # logit distance: row0 (ln3)^2, row1 (ln3)^2, row3 2^2, all over 2 classes
    expected_distance = 0.5 * ((2 * LN3**2 + 4.0) / 2) / 4
    assert terms["class"].item() == pytest.approx(expected_class)
    assert terms["consistency"].item() == pytest.approx(expected_consistency)
    assert terms["logit_distance"].item() == pytest.approx(expected_distance)
    assert terms["total"].item() == pytest.approx(expected_class + expected_consistency + expected_distance)
    assert terms["teacher_class"].item() == pytest.approx(2 * math.log(2) / 4)
    terms["total"].backward()
    assert teacher_logits.grad is None


def test_consistency_pulls_the_consistency_head_towards_the_teacher_class_head():
    class_logits = torch.zeros(2, 3, requires_grad=True)
    consistency_logits = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]], requires_grad=True)
    teacher_class = torch.tensor([[0.0, 0.0, 3.0], [1.0, 0.0, 0.0]])
    teacher_second = torch.full((2, 3), 100.0)  # must be ignored: the target is the teacher's class head
    terms = mean_teacher_loss(
        (class_logits, consistency_logits),
        (teacher_class, teacher_second),
        torch.tensor([-1, -1]),
        consistency_weight=1.0,
        consistency="kl",
        logit_distance_cost=0.0,
    )
    expected = softmax_kl_loss(consistency_logits, teacher_class).item() / 2
    assert terms["consistency"].item() == pytest.approx(expected)
    assert terms["class"].item() == 0.0
    terms["total"].backward()
    assert torch.equal(class_logits.grad, torch.zeros_like(class_logits))  # no labels, no tie
    assert consistency_logits.grad.abs().sum() > 0


def test_single_head_has_no_logit_distance():
    logits = torch.tensor([[1.0, -1.0]], requires_grad=True)
    terms = mean_teacher_loss(
        (logits, logits), (logits.detach(), logits.detach()), torch.tensor([0]), consistency_weight=3.0
    )
    assert terms["logit_distance"].item() == 0.0
    assert terms["consistency"].item() == pytest.approx(0.0, abs=1e-7)


def test_sigmoid_rampup_values():
    assert sigmoid_rampup(0, 5) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(2.5, 5) == pytest.approx(math.exp(-5 * 0.25))
    assert sigmoid_rampup(4, 5) == pytest.approx(math.exp(-5 * 0.04))
    assert sigmoid_rampup(5, 5) == 1.0
    assert sigmoid_rampup(50, 5) == 1.0
    assert sigmoid_rampup(-1, 5) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(0, 0) == 1.0


def test_linear_rampup_and_cosine_rampdown_values():
    assert linear_rampup(0.5, 2) == 0.25
    assert linear_rampup(2, 2) == 1.0
    assert linear_rampup(0, 0) == 1.0
    with pytest.raises(ValueError):
        linear_rampup(-0.1, 2)
    assert cosine_rampdown(0, 210) == 1.0
    assert cosine_rampdown(105, 210) == pytest.approx(0.5)
    assert cosine_rampdown(70, 210) == pytest.approx(0.75)
    assert cosine_rampdown(210, 210) == pytest.approx(0.0, abs=1e-12)
    assert cosine_rampdown(300, 210) == pytest.approx(0.0, abs=1e-12)  # clipped, never rises again


def test_consistency_weight_uses_integer_epoch_like_the_reference():
    mt = MeanTeacherConfig(consistency_weight=100.0, consistency_rampup_epochs=5)
    assert consistency_weight(mt, 2.7) == pytest.approx(100.0 * math.exp(-5 * (1 - 2 / 5) ** 2))
    mt.consistency_rampup_per_step = True
    assert consistency_weight(mt, 2.7) == pytest.approx(100.0 * math.exp(-5 * (1 - 2.7 / 5) ** 2))
    assert consistency_weight(mt, 9.0) == 100.0
    mt.enabled = False
    assert consistency_weight(mt, 9.0) == 0.0


def test_learning_rate_follows_the_imagenet_recipe():
    optim = load_config("imagenet-10pct-resnet152").optim  # 0.1 -> 0.025 over 2 epochs, cosine 75
    assert learning_rate(optim, 0.0) == pytest.approx(0.1)
    ramp_mid = 0.5 * (0.025 - 0.1) + 0.1
    assert learning_rate(optim, 1.0) == pytest.approx(ramp_mid * 0.5 * (math.cos(math.pi / 75) + 1))
    assert learning_rate(optim, 30.5) == pytest.approx(0.025 * 0.5 * (math.cos(math.pi * 30.5 / 75) + 1))
    optim.schedule_per_step = False
    assert learning_rate(optim, 30.5) == pytest.approx(0.025 * 0.5 * (math.cos(math.pi * 30 / 75) + 1))


def test_learning_rate_without_ramps_is_constant():
    optim = OptimConfig(lr=0.3, initial_lr=0.0, lr_rampup_epochs=0, lr_rampdown_epochs=0)
    assert learning_rate(optim, 0.0) == learning_rate(optim, 17.3) == 0.3
