"""Config schema: presets, typed overrides, errors naming the key, YAML round trip, world-size scaling."""

import dataclasses
import re

import pytest
import torch

from mt_scale.config import (
    PRESET_DIR,
    PRESETS,
    SECTIONS,
    Config,
    config_to_dict,
    config_to_yaml,
    load_config,
)
from mt_scale.device_plan import plan_devices, resolve_for_devices
from mt_scale.errors import MtScaleError


def test_the_three_presets_exist_and_load():
    assert set(PRESETS) == {"digits-demo", "cifar10-4000", "imagenet-10pct-resnet152"}
    for name in PRESETS:
        assert load_config(name).preset == name


def test_imagenet_preset_has_the_reference_values():
    cfg = load_config("imagenet-10pct-resnet152")
    assert (cfg.model.name, cfg.model.two_heads) == ("resnet152", True)
    # the paper's global batch: 10 GPUs x (40 images, 20 labeled), peak LR 10 x 0.025
    assert (cfg.data.batch_size, cfg.data.labeled_per_batch, cfg.run.batch_scope) == (400, 200, "global")
    assert (cfg.optim.lr, cfg.optim.initial_lr, cfg.optim.lr_rampup_epochs) == (0.25, 0.1, 2)
    assert cfg.run.max_device_batch == "auto"  # the device's memory decides; 40 is the reference's
    assert (cfg.optim.lr_rampdown_epochs, cfg.optim.weight_decay, cfg.optim.nesterov) == (75, 5e-5, True)
    assert (cfg.mt.ema_decay, cfg.mt.consistency, cfg.mt.consistency_weight) == (0.9997, "kl", 10.0)
    assert (cfg.mt.consistency_rampup_epochs, cfg.mt.logit_distance_cost, cfg.run.epochs) == (5, 0.01, 60)
    assert cfg.data.student_aug == cfg.data.teacher_aug == "imagenet-train"


def test_cifar_preset_has_the_reference_values():
    cfg = load_config("cifar10-4000")
    assert cfg.model.name == "cifar_shakeshake26"
    # cifar10_test.py, 4000 labels: 4 GPUs x (128 images, 31 labeled), lr 4 x 0.05, EMA 0.99, 300 epochs
    assert (cfg.data.batch_size, cfg.data.labeled_per_batch, cfg.run.batch_scope) == (512, 124, "global")
    assert (cfg.optim.lr, cfg.optim.lr_rampup_epochs, cfg.optim.lr_rampdown_epochs) == (0.2, 0, 350)
    assert (cfg.optim.weight_decay, cfg.mt.ema_decay, cfg.mt.consistency) == (2e-4, 0.99, "mse")
    assert (cfg.mt.consistency_weight, cfg.run.epochs, cfg.run.max_device_batch) == (100.0, 300, "128")
    assert cfg.data.mean == (0.4914, 0.4822, 0.4465)


@pytest.mark.parametrize("name", ["digits-demo", "cifar10-4000", "imagenet-10pct-resnet152"])
def test_every_preset_sets_every_field_with_a_source_comment(name):
    text = (PRESET_DIR / f"{name}.yaml").read_text()
    value_lines = [line for line in text.splitlines() if re.match(r"^  [a-z_]+:", line)]
    uncommented = [line for line in value_lines if "#" not in line]
    assert uncommented == []
    keys = {line.split(":")[0].strip() for line in value_lines}
    expected = {
        key for section in config_to_dict(Config()).values() if isinstance(section, dict) for key in section
    }
    assert keys == expected


def test_overrides_are_typed_by_the_field():
    cfg = load_config(
        "digits-demo",
        overrides=[
            "optim.lr=0.5",
            "run.epochs=12",
            "model.two_heads=false",
            "data.mean=[0.5, 0.25, 0.125]",
            "optim.weight_decay=1e-4",  # YAML reads this as a string; the float field converts it
            "run.output_dir=007",
            "optim.lr_rampdown_epochs=20",
        ],
    )
    assert cfg.optim.lr == 0.5 and isinstance(cfg.optim.lr, float)
    assert cfg.run.epochs == 12 and isinstance(cfg.run.epochs, int)
    assert cfg.model.two_heads is False
    assert cfg.data.mean == (0.5, 0.25, 0.125)
    assert cfg.optim.weight_decay == 1e-4
    assert cfg.run.output_dir == "007"
    assert cfg.optim.lr_rampdown_epochs == 20.0 and isinstance(cfg.optim.lr_rampdown_epochs, float)


def test_unknown_key_names_it_and_the_valid_keys():
    with pytest.raises(MtScaleError) as error:
        load_config("digits-demo", overrides=["optim.learning_rate=0.1"])
    message = str(error.value)
    assert "optim.learning_rate" in message and "initial_lr" in message and "nesterov" in message
    with pytest.raises(MtScaleError, match="unknown section 'optimizer'.*model, data, optim, mt, run"):
        load_config(overrides=["optimizer.lr=0.1"])


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("run.epochs=ten", "run.epochs"),
        ("model.two_heads=maybe", "true or false"),
        ("data.mean=[0.5, 0.5]", "3 values"),
        ("optim.lr", "section.key=value"),
        ("mt.consistency=l2", "mse or kl"),
        ("optim.lr_rampdown_epochs=5", "lr_rampdown_epochs"),  # shorter than the preset's 8 epochs
        ("data.labeled_per_batch=65", "labeled_per_batch"),
        ("run.mixed_precision=fp8", "no, bf16 or fp16"),
    ],
)
def test_bad_values_raise_mt_scale_error(override, pattern):
    with pytest.raises(MtScaleError, match=pattern):
        load_config("digits-demo", overrides=[override])


def test_yaml_round_trip_gives_an_equal_config(tmp_path):
    cfg = load_config("cifar10-4000", overrides=["optim.lr=0.07", "data.std=[0.2, 0.3, 0.4]"])
    path = tmp_path / "resolved.yaml"
    path.write_text(config_to_yaml(cfg))
    assert load_config(config_file=path) == cfg


def test_config_file_starts_from_its_preset_and_overrides_win(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("preset: imagenet-10pct-resnet152\noptim:\n  lr: 0.04\nrun:\n  epochs: 70\n")
    cfg = load_config(config_file=path, overrides=["optim.lr=0.03", "optim.lr_rampdown_epochs=80"])
    assert cfg.preset == "imagenet-10pct-resnet152"
    assert (cfg.optim.lr, cfg.run.epochs, cfg.optim.initial_lr) == (0.03, 70, 0.1)
    bad = tmp_path / "bad.yaml"
    bad.write_text("mt:\n  decay: 0.9\n")
    with pytest.raises(MtScaleError, match=r"bad\.yaml.*mt\.decay.*ema_decay"):
        load_config(config_file=bad)
    with pytest.raises(MtScaleError, match="not found"):
        load_config(config_file=tmp_path / "missing.yaml")
    with pytest.raises(MtScaleError, match="unknown preset 'imagenet'"):
        load_config("imagenet")


@pytest.mark.parametrize(("devices", "accum", "device_batch", "labeled"), [
    (1, 10, 40, [20]),  # the reference's 10 GPUs as 10 accumulated micro-batches
    (4, 4, 25, [13, 13, 12, 12]),  # fewest micro-batches first
    (8, 2, 25, [13] * 4 + [12] * 4),  # 100 labeled per micro-batch: floor or ceil per rank
    (10, 1, 40, [20] * 10),  # the reference's own layout
    (16, 1, 25, [13] * 8 + [12] * 8),
])
def test_imagenet_preset_keeps_the_global_batch_and_lr_on_any_device_count(devices, accum, device_batch, labeled):
    cfg = load_config("imagenet-10pct-resnet152", overrides=["run.max_device_batch=40"])  # the reference's cap
    plan = plan_devices(cfg, devices)
    assert (plan.grad_accum_steps, plan.device_batch, list(plan.labeled_per_rank)) == (accum, device_batch, labeled)
    assert plan.device_batch * devices * accum == plan.global_batch == 400
    assert sum(plan.labeled_per_rank) * accum == plan.global_labeled == 200
    assert plan.lr == 0.25
    assert plan.batchnorm_rows == device_batch and plan.device_limit == 40
    for rank in range(devices):
        resolved = resolve_for_devices(cfg, devices, rank)
        assert (resolved.data.batch_size, resolved.data.labeled_per_batch) == (device_batch, labeled[rank])
        assert (resolved.run.grad_accum_steps, resolved.optim.lr, resolved.optim.initial_lr) == (accum, 0.25, 0.1)
    assert cfg.data.batch_size == 400  # the input is not modified


@pytest.mark.parametrize(("devices", "measured", "layout"), [
    (8, 60, (1, 50)),  # 8 devices that hold 60 rows each: the paper's 400 as 50 x 1
    (1, 200, (2, 200)),
    (1, 150, (4, 100)),  # the largest device batch within the limit that splits the step evenly
    (8, None, (1, 50)),  # no limit measured (a CPU): the fewest micro-batches
    (1, None, (1, 400)),
])
def test_auto_sizes_micro_batches_by_what_the_device_holds(devices, measured, layout):
    cfg = load_config("imagenet-10pct-resnet152")
    plan = plan_devices(cfg, devices, measured)
    assert (plan.grad_accum_steps, plan.device_batch) == layout
    assert plan.batchnorm_rows == plan.device_batch and plan.device_limit == measured
    assert (plan.global_batch, plan.global_labeled, plan.lr) == (400, 200, 0.25)
    # an explicit row count wins over what was measured
    pinned = load_config("imagenet-10pct-resnet152", overrides=["run.max_device_batch=40"])
    assert plan_devices(pinned, devices, measured).device_batch <= 40
    assert "BatchNorm over" in plan.summary() and f"x {plan.device_batch} " in plan.summary()


def test_auto_measures_rows_from_the_step_memory():
    from mt_scale.memory import MEMORY_FRACTION, StepMemory, device_batch_limit

    cfg = load_config("imagenet-10pct-resnet152")
    gib = 2**30

    def measure(cfg, device, num_classes):  # what an 80 GiB device with a 2 GiB model and 1 GiB per row gives
        return StepMemory(fixed=2 * gib, per_row=gib), 80 * gib

    assert device_batch_limit(cfg, torch.device("cuda"), 1000, measure) == int(MEMORY_FRACTION * 80 - 2)
    assert device_batch_limit(cfg, torch.device("cpu"), 1000, measure) is None  # no device memory to size by
    for bad in ("-1", "forty", "4.5"):
        with pytest.raises(MtScaleError, match="run.max_device_batch"):
            load_config("imagenet-10pct-resnet152", overrides=[f"run.max_device_batch={bad}"])


def test_cifar_preset_keeps_the_papers_batch_of_512_with_124_labeled():
    cfg = load_config("cifar10-4000")
    assert [(p.grad_accum_steps, p.device_batch, p.labeled_per_rank) for p in map(lambda n: plan_devices(cfg, n), (1, 4))] == [
        (4, 128, (31,)), (1, 128, (31,) * 4)]
    assert plan_devices(cfg, 8).labeled_per_rank == (16,) * 4 + (15,) * 4


def test_per_device_scope_multiplies_the_lr_and_keeps_batches_per_device():
    cfg = load_config("imagenet-10pct-resnet152", overrides=[
        "run.batch_scope=per_device", "data.batch_size=40", "data.labeled_per_batch=20", "optim.lr=0.025"])
    scaled = resolve_for_devices(cfg, 8)
    assert scaled.optim.lr == pytest.approx(0.2)
    assert scaled.optim.initial_lr == 0.1  # the reference does not scale the ramp-up start
    assert (scaled.data.batch_size, scaled.data.labeled_per_batch) == (40, 20)  # per device
    assert plan_devices(cfg, 8).global_batch == 320
    accumulated = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, grad_accum_steps=2))
    assert resolve_for_devices(accumulated, 4).optim.lr == pytest.approx(0.2)
    with pytest.raises(MtScaleError):
        resolve_for_devices(cfg, 0)


def test_a_global_batch_that_cannot_be_split_is_one_clear_error():
    cfg = load_config("imagenet-10pct-resnet152")
    with pytest.raises(MtScaleError, match=r"400 rows \(200 labeled\).*7 devices.*batch_scope=per_device"):
        plan_devices(cfg, 7)
    with pytest.raises(MtScaleError, match="batch_scope"):
        load_config("imagenet-10pct-resnet152", overrides=["run.batch_scope=node"])


def test_sections_match_the_dataclass():
    assert tuple(f.name for f in dataclasses.fields(Config)) == (*SECTIONS, "preset")
