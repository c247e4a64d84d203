"""Optimizer factory and the per-step LR schedule."""

import math

import pytest
import torch
from torch import nn

from mt_scale.config import OptimConfig, load_config
from mt_scale.errors import MtScaleError
from mt_scale.optim import create_optimizer, create_scheduler, learning_rate


def _tiny_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))


def test_sgd_is_nesterov_with_weight_decay_on_every_parameter():
    model = _tiny_model()
    optimizer = create_optimizer(load_config("cifar10-4000").optim, model)
    assert isinstance(optimizer, torch.optim.SGD)
    params_with_decay = sum(
        len(group["params"]) for group in optimizer.param_groups if group["weight_decay"] == 2e-4
    )
    assert params_with_decay == len(list(model.parameters()))
    assert all(group["nesterov"] and group["momentum"] == 0.9 for group in optimizer.param_groups)


def test_plain_momentum_and_bias_filter_and_other_optimizers():
    model = _tiny_model()
    optimizer = create_optimizer(OptimConfig(nesterov=False, filter_bias_and_bn=True), model)
    assert not optimizer.param_groups[0]["nesterov"]
    decayed = sum(len(g["params"]) for g in optimizer.param_groups if g["weight_decay"] > 0)
    assert decayed == 2  # the two Linear weights; biases and BN parameters are filtered
    adamw = create_optimizer(OptimConfig(name="adamw", lr=1e-3, weight_decay=0.05), model)
    assert isinstance(adamw, torch.optim.AdamW)
    with pytest.raises(MtScaleError, match="not a timm optimizer"):
        create_optimizer(OptimConfig(name="sgdd"), model)


def test_scheduler_gives_the_reference_lr_at_every_step():
    cfg = load_config("imagenet-10pct-resnet152").optim
    model = _tiny_model()
    optimizer = create_optimizer(cfg, model)
    scheduler = create_scheduler(cfg, optimizer, steps_per_epoch=4)
    seen = []
    for _ in range(12):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # step 0: initial_lr 0.1; step 6 = epoch 1.5: 3/4 of the way from 0.1 to 0.025, times the cosine
    assert seen[0] == pytest.approx(0.1)
    assert seen[6] == pytest.approx((0.1 + 0.75 * (0.025 - 0.1)) * 0.5 * (math.cos(math.pi * 1.5 / 75) + 1))
    assert seen[9] == pytest.approx(0.025 * 0.5 * (math.cos(math.pi * 2.25 / 75) + 1))
    assert seen == pytest.approx([learning_rate(cfg, step / 4) for step in range(12)])


def test_scheduler_resumes_where_it_stopped():
    cfg = load_config("cifar10-4000").optim
    optimizer = create_optimizer(cfg, _tiny_model())
    scheduler = create_scheduler(cfg, optimizer, steps_per_epoch=10)
    for _ in range(25):
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()
    fresh_optimizer = create_optimizer(cfg, _tiny_model())
    resumed = create_scheduler(cfg, fresh_optimizer, steps_per_epoch=10)
    resumed.load_state_dict(state)
    fresh_optimizer.step()
    resumed.step()
    assert fresh_optimizer.param_groups[0]["lr"] == pytest.approx(learning_rate(cfg, 2.6))


def test_scheduler_rejects_empty_epochs():
    cfg = OptimConfig()
    with pytest.raises(MtScaleError, match="steps_per_epoch"):
        create_scheduler(cfg, create_optimizer(cfg, _tiny_model()), steps_per_epoch=0)
