"""Model factory: any timm architecture by name, wrapped with the reference's optional second head.

Importing it registers the reference's models with timm (mt_resnext152_32x4d, cifar_shakeshake26)
and the demo's mt_digits_cnn, so `timm.create_model` builds them and loads an exported teacher.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import timm
import torch
from timm.models import register_model
from timm.models.resnet import Bottleneck, ResNet
from torch import nn

from mt_scale.errors import MtScaleError

if TYPE_CHECKING:
    from mt_scale.config import ModelConfig

# keyword arguments timm.create_model passes to every entrypoint
_TIMM_CREATE_ARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def _entry_kwargs(name: str, pretrained: bool, kwargs: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """Our models publish no weights; pretrained=True loads an exported teacher named by `file`.

    `timm.create_model(name, num_classes=K, pretrained=True, pretrained_cfg_overlay=dict(file=PATH))`
    then works for our registered models as it does for timm's own.
    """
    file = None
    for source in (kwargs.get("pretrained_cfg_overlay"), kwargs.get("pretrained_cfg")):
        if isinstance(source, dict) and source.get("file"):
            file = str(source["file"])
            break
    if pretrained and file is None:
        raise MtScaleError(
            f"model {name!r} has no pretrained weights; use pretrained=False, or load an exported "
            "teacher with pretrained_cfg_overlay=dict(file=PATH)"
        )
    return {k: v for k, v in kwargs.items() if k not in _TIMM_CREATE_ARGS}, (file if pretrained else None)


def _load_exported(model: nn.Module, file: str | None) -> nn.Module:
    if file is not None:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(file), strict=True)
    return model


class _Shake(torch.autograd.Function):
    """Shake-shake mixing: a random per-sample gate forward, an independent one backward."""

    @staticmethod
    def forward(ctx: Any, branch_a: torch.Tensor, branch_b: torch.Tensor, training: bool) -> torch.Tensor:
        gate_shape = (branch_a.shape[0],) + (1,) * (branch_a.dim() - 1)
        if training:
            gate = torch.rand(gate_shape, dtype=branch_a.dtype, device=branch_a.device)
        else:
            gate = torch.full(gate_shape, 0.5, dtype=branch_a.dtype, device=branch_a.device)
        return branch_a * gate + branch_b * (1.0 - gate)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        gate_shape = (grad_output.shape[0],) + (1,) * (grad_output.dim() - 1)
        gate = torch.rand(gate_shape, dtype=grad_output.dtype, device=grad_output.device)
        return grad_output * gate, grad_output * (1.0 - gate), None


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


class _ShiftConvDownsample(nn.Module):
    """Halve the resolution with two pixel-shifted subsamplings, a grouped 1x1 conv and BN."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2 * in_channels, out_channels, kernel_size=1, groups=2)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat((x[:, :, 0::2, 0::2], x[:, :, 1::2, 1::2]), dim=1)
        return self.bn(self.conv(torch.relu(x)))


class _ShakeShakeBlock(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.branch_a = self._branch(in_channels, channels, stride)
        self.branch_b = self._branch(in_channels, channels, stride)
        if stride != 1:
            self.downsample: nn.Module | None = _ShiftConvDownsample(in_channels, channels)
        elif in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, kernel_size=1, bias=False), nn.BatchNorm2d(channels)
            )
        else:
            self.downsample = None

    @staticmethod
    def _branch(in_channels: int, channels: int, stride: int) -> nn.Sequential:
        return nn.Sequential(
            nn.ReLU(),
            _conv3x3(in_channels, channels, stride),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            _conv3x3(channels, channels),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed = _Shake.apply(self.branch_a(x), self.branch_b(x), self.training)
        residual = x if self.downsample is None else self.downsample(x)
        return residual + mixed


class _TimmHeadMixin:
    """The slice of timm's model API our trainer and `MeanTeacherNet` use: pooled features + fc."""

    fc: nn.Module
    num_features: int
    num_classes: int
    drop_rate: float

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(2, 3))  # global average pooling (the reference's AvgPool2d(8) at 32x32)
        if self.drop_rate:
            x = nn.functional.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class ShakeShakeResNet(_TimmHeadMixin, nn.Module):
    """The reference's ResNet32x32 with shake-shake blocks (3 stages, widths c, 2c, 4c)."""

    def __init__(
        self,
        layers: tuple[int, ...] = (4, 4, 4),
        channels: int = 96,
        num_classes: int = 10,
        in_chans: int = 3,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_classes, self.drop_rate = num_classes, drop_rate
        self.conv1 = _conv3x3(in_chans, 16)
        stages, in_channels = [], 16
        for index, depth in enumerate(layers):
            width = channels * 2**index
            blocks = [_ShakeShakeBlock(in_channels, width, stride=1 if index == 0 else 2)]
            blocks += [_ShakeShakeBlock(width, width) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            in_channels = width
        self.stages = nn.Sequential(*stages)
        self.num_features = in_channels
        self.fc = nn.Linear(in_channels, num_classes)
        _reference_init(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.conv1(x))


class DigitsCNN(_TimmHeadMixin, nn.Module):
    """Three conv stages (widths w, 2w, 4w) with BN and leaky ReLU, for 32x32 inputs; ~0.14M params at width 32."""

    def __init__(
        self, num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.0, width: int = 32
    ) -> None:
        super().__init__()
        self.num_classes, self.drop_rate = num_classes, drop_rate

        def conv_bn(cin: int, cout: int) -> list[nn.Module]:
            return [_conv3x3(cin, cout), nn.BatchNorm2d(cout), nn.LeakyReLU(0.1, inplace=True)]

        self.features = nn.Sequential(
            *conv_bn(in_chans, width), *conv_bn(width, width), nn.MaxPool2d(2),
            *conv_bn(width, 2 * width), *conv_bn(2 * width, 2 * width), nn.MaxPool2d(2),
            *conv_bn(2 * width, 4 * width),
        )  # fmt: skip
        self.num_features = 4 * width
        self.fc = nn.Linear(self.num_features, num_classes)
        _reference_init(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def _reference_init(model: nn.Module) -> None:
    # the reference's init: conv weights N(0, 2 / (k*k*out_channels)), BN weight 1 and bias 0
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


@register_model
def mt_resnext152_32x4d(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """The reference's ImageNet model (architectures.resnext152)."""
    kwargs, file = _entry_kwargs("mt_resnext152_32x4d", pretrained, kwargs)
    kwargs.setdefault("zero_init_last", False)  # the reference initialises every BN weight to 1
    model = ResNet(block=Bottleneck, layers=(3, 8, 36, 3), cardinality=32, base_width=4, **kwargs)
    return _load_exported(model, file)


@register_model
def cifar_shakeshake26(pretrained: bool = False, **kwargs: Any) -> ShakeShakeResNet:
    """The reference's CIFAR-10 model (architectures.cifar_shakeshake26)."""
    kwargs, file = _entry_kwargs("cifar_shakeshake26", pretrained, kwargs)
    return _load_exported(ShakeShakeResNet(layers=(4, 4, 4), channels=96, **kwargs), file)


@register_model
def mt_digits_cnn(pretrained: bool = False, **kwargs: Any) -> DigitsCNN:
    """Small convnet for the CPU demo (32x32 RGB digits)."""
    kwargs, file = _entry_kwargs("mt_digits_cnn", pretrained, kwargs)
    return _load_exported(DigitsCNN(**kwargs), file)


class MeanTeacherNet(nn.Module):
    """A timm backbone plus an optional consistency head; forward returns a 2-tuple of logits."""

    def __init__(self, backbone: nn.Module, two_heads: bool) -> None:
        super().__init__()
        self.backbone = backbone
        classifier = backbone.get_classifier()
        if two_heads and not isinstance(classifier, nn.Linear):
            raise MtScaleError(
                f"model.two_heads needs a timm model with a single nn.Linear classifier; "
                f"{type(backbone).__name__} has {type(classifier).__name__}: set model.two_heads=false"
            )
        self.consistency_head = (
            nn.Linear(classifier.in_features, classifier.out_features) if two_heads else None
        )

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.consistency_head is None:
            logits = self.backbone(images)
            return logits, logits
        features = self.backbone.forward_head(self.backbone.forward_features(images), pre_logits=True)
        return self.backbone.get_classifier()(features), self.consistency_head(features)


def create_model(cfg: ModelConfig, num_classes: int) -> MeanTeacherNet:
    """Build `cfg.name` from timm's registry (pretrained=False), wrapped with the second head.

    `cfg.channels_last` converts the memory format here. `cfg.compile` is applied by the trainer
    with `compile_model` after Accelerate has wrapped the student (compiling the DDP module, as
    PyTorch recommends); the teacher helpers unwrap compiled students.
    """
    if not timm.is_model(cfg.name):
        raise MtScaleError(
            f"model.name={cfg.name!r} is not a timm model; see timm.list_models() "
            "(ours: mt_resnext152_32x4d, cifar_shakeshake26, mt_digits_cnn)"
        )
    backbone = timm.create_model(
        cfg.name,
        pretrained=False,
        num_classes=num_classes,
        in_chans=cfg.in_chans,
        drop_rate=cfg.drop_rate,
    )
    model = MeanTeacherNet(backbone, cfg.two_heads)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def compile_model(model: nn.Module, cfg: ModelConfig) -> nn.Module:
    """torch.compile(model) when cfg.compile, else the model unchanged."""
    return torch.compile(model) if cfg.compile else model


def export_class_head_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's state dict with stock timm keys and its single class head.

    `timm.create_model(name, num_classes=...)` loads it with strict=True; the consistency head,
    used only during training, is dropped. Accepts DDP-wrapped or compiled models.
    """
    from mt_scale.teacher import unwrap_model

    net = unwrap_model(model)
    if not isinstance(net, MeanTeacherNet):
        raise TypeError(f"expected a model from create_model, got {type(net).__name__}")
    return {key: value.detach().clone() for key, value in net.backbone.state_dict().items()}
