"""Model factory: registered timm models, the two heads, export to a stock timm state dict."""

import pytest
import timm
import torch
from torch import nn

import mt_scale  # noqa: F401  (registers our models with timm)
from mt_scale.config import ModelConfig
from mt_scale.errors import MtScaleError
from mt_scale.model import _Shake, create_model, export_class_head_state_dict
from mt_scale.teacher import unwrap_model


def test_our_models_are_registered_with_timm():
    for name in ("mt_resnext152_32x4d", "cifar_shakeshake26", "mt_digits_cnn"):
        assert name in timm.list_models()
    with pytest.raises(MtScaleError, match="no pretrained weights"):
        timm.create_model("mt_digits_cnn", pretrained=True)


def test_two_heads_give_two_different_logit_tensors():
    torch.manual_seed(0)
    model = create_model(ModelConfig(name="mt_digits_cnn", two_heads=True), num_classes=10)
    class_logits, consistency_logits = model(torch.randn(4, 3, 32, 32))
    assert class_logits.shape == consistency_logits.shape == (4, 10)
    assert not torch.allclose(class_logits, consistency_logits)
    assert isinstance(model.consistency_head, nn.Linear)


def test_single_head_returns_the_same_tensor_twice():
    model = create_model(ModelConfig(name="mt_digits_cnn", two_heads=False), num_classes=7)
    outputs = model(torch.randn(2, 3, 32, 32))
    assert len(outputs) == 2 and outputs[0] is outputs[1] and outputs[0].shape == (2, 7)


def test_any_timm_model_and_channels_last():
    model = create_model(ModelConfig(name="resnet18", two_heads=True, channels_last=True), num_classes=5)
    conv = model.backbone.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    model.eval()
    class_logits, consistency_logits = model(torch.randn(2, 3, 64, 64))
    assert class_logits.shape == consistency_logits.shape == (2, 5)
    with pytest.raises(MtScaleError, match="not a timm model"):
        create_model(ModelConfig(name="resnet_9000"), num_classes=5)


def test_export_loads_into_a_stock_timm_model_with_equal_outputs():
    torch.manual_seed(1)
    model = create_model(ModelConfig(name="resnet18", two_heads=True), num_classes=6).eval()
    state = export_class_head_state_dict(torch.compile(model))  # compiled wrappers are unwrapped
    assert not any(key.startswith(("backbone.", "consistency_head")) for key in state)
    stock = timm.create_model("resnet18", pretrained=False, num_classes=6)
    stock.load_state_dict(state, strict=True)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(stock.eval()(images), model(images)[0], atol=1e-5)


def test_resnext152_matches_the_reference_layout():
    net = timm.create_model("mt_resnext152_32x4d", num_classes=1000)
    assert [len(stage) for stage in (net.layer1, net.layer2, net.layer3, net.layer4)] == [3, 8, 36, 3]
    first = net.layer1[0]
    # the reference: 32 groups, 128 planes in the first stage's grouped conv, 2x planes out
    assert (first.conv2.groups, first.conv2.in_channels, first.conv3.out_channels) == (32, 128, 256)
    assert net.layer4[0].conv3.out_channels == net.num_features == 2048
    assert torch.equal(net.layer4[2].bn3.weight, torch.ones(2048))  # no zero-init of the last BN


def test_shakeshake26_matches_the_reference_size_and_is_deterministic_in_eval():
    torch.manual_seed(2)
    net = timm.create_model("cifar_shakeshake26", num_classes=10)
    # 26.2M parameters: the Shake-Shake 26 2x96d count of Gastaldi (2017), as the reference's
    assert sum(p.numel() for p in net.parameters()) == 26_193_466
    assert [stage[0].branch_a[1].out_channels for stage in net.stages] == [96, 192, 384]
    images = torch.randn(2, 3, 16, 16)  # global pooling: any even size works; 16 keeps the test fast
    net.eval()
    with torch.no_grad():
        first = net(images)
        assert first.shape == (2, 10) and torch.equal(first, net(images))


def test_shake_mixes_per_sample_and_draws_a_new_gate_backward():
    torch.manual_seed(3)
    branch_a = torch.randn(5, 2, 3, 3, requires_grad=True)
    branch_b = torch.randn(5, 2, 3, 3, requires_grad=True)
    assert torch.allclose(_Shake.apply(branch_a, branch_b, False), (branch_a + branch_b) / 2)
    mixed = _Shake.apply(branch_a, branch_b, True)
    # one gate per sample: (mixed - b) / (a - b) is constant within a sample and in [0, 1]
    ratio = ((mixed - branch_b) / (branch_a - branch_b)).detach().flatten(1)
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), atol=1e-4)
    assert ((ratio >= 0) & (ratio <= 1)).all()
    mixed.backward(torch.ones_like(mixed))
    grad_ratio = branch_a.grad.flatten(1)
    assert torch.allclose(branch_a.grad + branch_b.grad, torch.ones_like(mixed))
    assert not torch.allclose(grad_ratio[:, 0], ratio[:, 0])  # an independent gate backward


def test_unwrap_model_sees_through_compile():
    model = create_model(ModelConfig(name="mt_digits_cnn"), num_classes=3)
    assert unwrap_model(torch.compile(model)) is model


def test_exported_teacher_of_our_model_loads_in_stock_timm(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = create_model(ModelConfig(name="mt_digits_cnn", two_heads=True), num_classes=10).eval()
    path = tmp_path / "teacher.safetensors"
    save_file(export_class_head_state_dict(model), str(path))
    stock = timm.create_model(
        "mt_digits_cnn", num_classes=10, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))
    ).eval()
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(stock(images), model(images)[0], atol=1e-5)
