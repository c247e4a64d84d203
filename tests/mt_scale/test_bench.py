"""mt-bench at tiny sizes: every subcommand's JSON schema, and figures that agree with each other.

No timing thresholds (the machine is shared): the checks are on counts, names, units, statistics
and ratios that must follow from the raw values.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch

from mt_scale.bench.common import figure
from mt_scale.bench.pipeline import derived_figures
from mt_scale.bench.runner import TARGETS, check_targets, format_table, loader_vs_step
from mt_scale.bench.train import graph_speedup, is_out_of_memory, largest_batch
from mt_scale.cli import bench_main
from mt_scale.errors import MtScaleError
from pipelines import resolve_backend

PIPELINE_FIGURES = {"pipeline/dali", "pipeline/torch", "pipeline/reference", "pipeline/decode_ceiling"}
PACK_FIGURES = {
    "pack/workers_1",
    "pack/workers_all",
    "pack/workers_1_max_side",
    "pack/workers_all_max_side",
    "pack/tarwriter_loop",
}
RESNET18_PARAMETERS = 11_689_512  # torchvision/timm resnet18 with a 1000-class head


def run_bench(tmp_path: Path, capsys: pytest.CaptureFixture, *argv: str) -> dict:
    out = tmp_path / "bench.json"
    assert bench_main([*argv, "--json", str(out), "--work-dir", str(tmp_path / "work")]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    check_schema(report)
    for result in report["results"]:  # the table shows every figure
        assert result["name"] in printed
    return report


def check_schema(report: dict) -> None:
    assert report["tool"] == "mt-bench"
    machine = report["machine"]
    assert machine["usable_cores"] >= 1 and machine["cpu_count"] >= machine["usable_cores"]
    assert report["libraries"]["torch"] and report["libraries"]["timm"] and report["libraries"]["webdataset"]
    names = [result["name"] for result in report["results"]]
    assert len(names) == len(set(names))
    for result in report["results"]:
        assert set(result) >= {"name", "unit", "median", "min", "max", "repeats", "values", "detail"}
        assert len(result["values"]) == result["repeats"]
        assert result["min"] == min(result["values"]) and result["max"] == max(result["values"])
        assert result["median"] == pytest.approx(statistics.median(result["values"]))
        assert 0 < result["min"] <= result["median"] <= result["max"]


def by_name(report: dict) -> dict[str, dict]:
    return {result["name"]: result for result in report["results"]}


def test_figure_statistics_and_table() -> None:
    result = figure("x/y", "img/s", [3.0, 1.0, 2.0, 10.0], images=5)
    assert (result["median"], result["min"], result["max"], result["repeats"]) == (2.5, 1.0, 10.0, 4)
    assert result["detail"] == {"images": 5}
    table = format_table([result]).splitlines()
    assert table[0].split() == ["figure", "unit", "median", "min", "max", "n"]
    assert table[2].split() == ["x/y", "img/s", "2.5", "1", "10", "4"]
    markdown = format_table([result], markdown=True).splitlines()
    assert markdown[2] == "| `x/y` | img/s | 2.5 | 1 | 10 | 4 |"
    with pytest.raises(ValueError):
        figure("x/y", "img/s", [])


def test_targets_and_derived_pipeline_ratios() -> None:
    results = [
        figure("pipeline/torch", "img/s", [600.0, 660.0]),
        figure("pipeline/dali", "img/s", [200.0, 220.0]),
        figure("pipeline/reference", "img/s", [100.0, 200.0]),
        figure("pipeline/decode_ceiling", "img/s", [1200.0, 1100.0]),
    ]
    results = [{**r, "detail": {"device": "cpu"}} for r in results]
    derived = by_name({"results": derived_figures(results)})
    # The best backend (torch) divided repeat by repeat, since the contenders ran interleaved.
    assert derived["pipeline/best_vs_reference"]["values"] == [6.0, 3.3]
    assert derived["pipeline/best_vs_ceiling"]["values"] == [0.5, 0.6]
    assert derived["pipeline/best_vs_reference"]["detail"] == {"best": "pipeline/torch", "device": "cpu"}
    checks = {c["figure"]: c["holds"] for c in check_targets(results + list(derived.values()))}
    assert checks == {"pipeline/best_vs_reference": True, "pipeline/best_vs_ceiling": True}
    slow = [figure("train/step_ratio", "x", [1.6], device="cpu"), figure("ema/speedup", "x", [1.1], device="cpu")]
    assert [c["holds"] for c in check_targets(slow)] == [False, False]


def test_targets_are_judged_on_the_device_they_name() -> None:
    on_gpu = [figure("ema/speedup", "x", [4.0], device="cuda"), figure("train/e2e_vs_step", "x", [0.97], device="cuda"),
              figure("train/step_ratio", "x", [3.0], device="cuda")]  # fmt: skip
    checks = [(c["figure"], c["threshold"], c["holds"]) for c in check_targets(on_gpu)]
    # The GPU's EMA goal (10x) applies, not the CPU's (1.25x); the CPU-only step ratio goal is not judged.
    assert checks == [("train/e2e_vs_step", ">= 0.95", True), ("ema/speedup", ">= 10.0", False)]
    unknown_device = [figure("ema/speedup", "x", [4.0])]
    assert check_targets(unknown_device) == []


def test_loader_vs_step_compares_the_loader_training_would_use() -> None:
    step = figure("train/mean_teacher", "img/s", [500.0, 700.0, 600.0], device="cuda", batch_size=40)
    dali = figure("pipeline/dali", "img/s", [9000.0], backend="dali", device="cuda")
    torch_loader = figure("pipeline/torch", "img/s", [900.0], backend="torch", device="cuda")
    (ratio,) = loader_vs_step([step, torch_loader, dali])
    assert ratio["values"] == [15.0] and ratio["detail"]["loader"] == "pipeline/dali"  # medians: 9000 / 600
    assert [(c["figure"], c["holds"]) for c in check_targets([ratio])] == [("pipeline/loader_vs_step", True)]
    on_cpu = figure("train/mean_teacher", "img/s", [60.0], device="cpu")
    (cpu_ratio,) = loader_vs_step([on_cpu, torch_loader, dali])
    assert cpu_ratio["values"] == [15.0] and cpu_ratio["detail"]["loader"] == "pipeline/torch"
    assert check_targets([cpu_ratio]) == [] and loader_vs_step([dali]) == []


def test_largest_batch_doubles_until_out_of_memory_then_bisects() -> None:
    tried: list[int] = []

    def fits(batch: int) -> bool:
        tried.append(batch)
        return batch <= 300

    assert largest_batch(fits, 40, 2048) == (296, "320 rows ran out of memory")
    assert tried[:4] == [40, 80, 160, 320] and all(size % 8 == 0 for size in tried)
    assert largest_batch(lambda batch: True, 40, 200) == (160, "stopped at the cap of 200 rows")
    with pytest.raises(MtScaleError, match="40 rows do not fit"):
        largest_batch(lambda batch: False, 40, 2048)


def test_out_of_memory_is_recognised_as_torch_and_the_step_word_it() -> None:
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 9 GB"))
    assert is_out_of_memory(MtScaleError("out of memory with data.batch_size=640 per device: lower it"))
    assert not is_out_of_memory(RuntimeError("shapes do not match"))
    assert not is_out_of_memory(MtScaleError("run.shards is empty"))


def test_pack_counts_every_generated_image(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    report = run_bench(
        tmp_path, capsys, "pack", "--count", "12", "--size", "96x72", "--max-side", "48", "--repeats", "2"
    )
    results = by_name(report)
    assert set(results) == PACK_FIGURES
    for result in results.values():
        assert result["unit"] == "img/s" and result["detail"]["images"] == 12
        assert result["detail"]["shard_size"] == 100
    assert results["pack/workers_1"]["detail"]["workers"] == 1
    assert results["pack/workers_all"]["detail"]["workers"] == report["machine"]["usable_cores"]
    assert results["pack/workers_1_max_side"]["detail"]["max_side"] == 48
    assert (tmp_path / "work" / "photos-12-96x72-seed0" / "train").is_dir()  # --work-dir keeps them
    assert not list((tmp_path / "work").glob("pack-*"))  # each repeat's output is removed


def test_pipeline_on_an_existing_tree(
    photo_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    plot = tmp_path / "pipeline.png"
    report = run_bench(
        tmp_path, capsys, "pipeline", "--images", str(photo_tree), "--batch-size", "8",
        "--labeled-per-batch", "2", "--workers", "1", "--repeats", "1", "--plot", str(plot),
    )  # fmt: skip
    results = by_name(report)
    normalized = f"pipeline/{resolve_backend('auto')}_normalized"  # the backend this machine trains with
    derived = {"pipeline/best_vs_reference", "pipeline/best_vs_ceiling"}
    assert set(results) == PIPELINE_FIGURES | derived | {normalized}
    # The photo tree has 64 training JPEGs: the baselines read each once per epoch; the backends'
    # epoch is the 48 unlabeled images in batches of 6 (+2 labeled) = 8 batches of 8 rows.
    for name in PIPELINE_FIGURES | {normalized}:
        assert results[name]["detail"]["images_per_epoch"] == 64, name
        assert results[name]["detail"]["source_images"] == 64
    assert results["pipeline/dali"]["detail"]["backend"] == "dali"
    assert results["pipeline/torch"]["detail"]["backend"] == "torch"
    best = max(results[f"pipeline/{b}"]["median"] for b in ("dali", "torch"))
    ratio = results["pipeline/best_vs_reference"]["median"]
    assert ratio == pytest.approx(best / results["pipeline/reference"]["median"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_ratio_follows_from_the_two_rates(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    report = run_bench(
        tmp_path, capsys, "train", "--model", "mt_digits_cnn", "--image-size", "32", "--batch-size", "8",
        "--steps", "1", "--repeats", "2", "--device", "cpu",
    )  # fmt: skip
    results = by_name(report)
    kinds = {"train/supervised", "train/mean_teacher", "train/supervised_baseline"}
    assert set(results) == kinds | {"train/step_ratio"}
    sup, mt = results["train/supervised"]["values"], results["train/mean_teacher"]["values"]
    # Same batch and step count: time ratio = inverse ratio of the image rates, repeat by repeat.
    assert results["train/step_ratio"]["values"] == pytest.approx(
        [s / m for s, m in zip(sup, mt, strict=True)]
    )
    detail = results["train/step_ratio"]["detail"]
    assert (detail["model"], detail["image_size"], detail["batch_size"]) == ("mt_digits_cnn", 32, 8)
    assert (detail["labeled_per_batch"], detail["device"], detail["precision"]) == (2, "cpu", "fp32")


def test_end_to_end_ratio_follows_from_the_loop_and_the_step(
    photo_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    report = run_bench(
        tmp_path, capsys, "train", "--model", "mt_digits_cnn", "--image-size", "32", "--batch-size", "8",
        "--steps", "1", "--repeats", "2", "--device", "cpu", "--end-to-end", "--e2e-shards", str(photo_shards),
        "--e2e-model", "mt_digits_cnn",
    )  # fmt: skip
    results = by_name(report)
    loop, step = results["train/e2e_loop"]["values"], results["train/e2e_step"]["values"]
    assert results["train/e2e_vs_step"]["values"] == pytest.approx([lo / st for lo, st in zip(loop, step, strict=True)])
    detail = results["train/e2e_vs_step"]["detail"]
    # digits-demo's rows: 16 labeled + 48 unlabeled; the photo set's 48 unlabeled images make one step an
    # epoch, and the loop trains the default 2 epochs; the bare step runs those same 2 steps.
    assert (detail["preset"], detail["model"], detail["steps"], detail["epochs"]) == ("digits-demo", "mt_digits_cnn", 2, 2)
    assert (detail["batch_size"], detail["backend"], detail["device"]) == (64, "torch", "cpu")
    assert [c["figure"] for c in report["targets"] if c["figure"].startswith("train/e2e")] == ["train/e2e_vs_step"]
    assert not (tmp_path / "work" / "e2e-run").exists()  # the loop's run folder is removed


def test_end_to_end_config_trains_without_evaluations_or_checkpoints_between_epochs(tmp_path: Path) -> None:
    from mt_scale.bench.common import Device
    from mt_scale.bench.end_to_end import EndToEnd, loop_config

    setup = EndToEnd(model="resnet18", epochs=3, model_overrides=["model.channels_last=false"])
    cfg = loop_config(setup, Device("cpu", "fp32", False), tmp_path / "shards", tmp_path / "run")
    assert (cfg.run.epochs, cfg.run.eval_every_epochs, cfg.run.checkpoint_every_epochs) == (3, 0, 0)
    assert (cfg.model.name, cfg.data.backend, cfg.run.mixed_precision) == ("resnet18", "torch", "no")
    assert (cfg.run.shards, cfg.run.log_every_steps) == (str(tmp_path / "shards"), 25)  # the preset's cadence
    on_gpu = loop_config(EndToEnd(), Device("cuda", "bf16", True), tmp_path / "shards", tmp_path / "run")
    assert (on_gpu.data.backend, on_gpu.run.mixed_precision) == ("dali", "bf16")


def test_max_batch_and_cuda_graph_flags_say_what_they_need(capsys: pytest.CaptureFixture) -> None:
    from mt_scale.bench.common import Device
    from mt_scale.bench.train import graph_modes, model_overrides

    assert bench_main(["train", "--device", "cpu", "--max-batch", "--repeats", "1", "--steps", "1",
                       "--model", "mt_digits_cnn", "--image-size", "32", "--batch-size", "8"]) == 2  # fmt: skip
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors == ["mt-bench: error: --max-batch searches a GPU's memory; use it with --device cuda"]
    cpu, gpu = Device("cpu", "fp32", False), Device("cuda", "bf16", True)
    assert model_overrides(cpu, compile=True) == ["model.channels_last=false", "model.compile=true"]
    assert model_overrides(gpu, cuda_graph=False)[-1] == "model.cuda_graph=false"
    assert model_overrides(gpu, cuda_graph=True)[-1] == "model.cuda_graph=true"
    # Without a choice a GPU times the step both ways, the eager figures suffixed; a CPU the preset's way.
    assert graph_modes(gpu, None) == [(True, ""), (False, "/eager")]
    assert graph_modes(gpu, False) == [(False, "")] and graph_modes(cpu, None) == [(None, "")]


def test_graph_speedup_is_the_graphed_rate_over_the_eager_one_per_repeat() -> None:
    detail = {"model": "resnet152", "image_size": 224, "batch_size": 40, "device": "cuda", "precision": "bf16"}
    figures = [figure("train/mean_teacher", "img/s", [1200.0, 1100.0], **detail, step_mode="CUDA graphs"),
               figure("train/mean_teacher/eager", "img/s", [600.0, 550.0], **detail, step_mode="eager")]  # fmt: skip
    (speedup,) = graph_speedup(figures)
    assert speedup["name"] == "train/graph_speedup" and speedup["values"] == [2.0, 2.0]
    assert [c["holds"] for c in check_targets([speedup])] == [True]
    assert graph_speedup(figures[:1]) == []


def test_ema_speedup_follows_from_the_two_times(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    markdown = tmp_path / "out" / "bench.md"
    report = run_bench(tmp_path, capsys, "ema", "--model", "resnet18", "--updates", "2", "--repeats", "2",
                       "--markdown", str(markdown))  # fmt: skip
    table = markdown.read_text()
    assert table.startswith("| figure | unit |") and "| `ema/speedup` | x |" in table
    assert "target ema/speedup >= 1.25: median" in table
    results = by_name(report)
    fused, loop = results["ema/fused_ms"]["values"], results["ema/loop_ms"]["values"]
    assert results["ema/speedup"]["values"] == pytest.approx(
        [lo / fu for lo, fu in zip(loop, fused, strict=True)]
    )
    assert results["ema/fused_ms"]["unit"] == "ms" and results["ema/speedup"]["unit"] == "x"
    assert results["ema/speedup"]["detail"]["parameters"] == RESNET18_PARAMETERS


def test_all_runs_every_stage(
    photo_tree: Path, photo_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    tiny = {
        "pipeline-batch-size": 8,
        "pipeline-labeled-per-batch": 2,
        "pipeline-backends": "torch",
        "train-model": "mt_digits_cnn",
        "train-image-size": 32,
        "train-batch-size": 8,
        "train-steps": 1,
        "ema-model": "resnet18",
        "ema-updates": 1,
        "train-e2e-shards": photo_shards,
        "train-e2e-epochs": 1,
    }
    report = run_bench(
        tmp_path, capsys, "all", "--images", str(photo_tree), "--workers", "1", "--repeats", "1",
        "--device", "cpu", *(item for flag, value in tiny.items() for item in (f"--{flag}", str(value))),
    )  # fmt: skip
    names = set(by_name(report))
    assert PACK_FIGURES <= names
    assert {"pipeline/torch", "pipeline/reference", "pipeline/decode_ceiling"} <= names
    assert {"train/step_ratio", "ema/speedup", "pipeline/best_vs_reference"} <= names
    assert {"train/e2e_loop", "train/e2e_step", "train/e2e_vs_step"} <= names  # on by default in `all`
    measured_by_all = {t.figure for t in TARGETS if t.device != "cuda" and not t.figure.startswith("loader/")}
    assert {check["figure"] for check in report["targets"]} == measured_by_all  # loader/: --source s3
    assert report["settings"]["command"] == "all"


def test_bad_images_folder_is_one_line_and_status_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert bench_main(["pipeline", "--images", str(tmp_path / "missing"), "--repeats", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mt-bench: ") and "--images" in err[0]


def test_unwritable_json_is_one_line_and_status_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    argv = [
        "ema",
        "--model",
        "mt_digits_cnn",
        "--updates",
        "1",
        "--repeats",
        "1",
        "--json",
        str(blocker / "x.json"),
    ]
    assert bench_main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mt-bench")]
    assert len(errors) == 1 and errors[0].startswith("mt-bench: error: cannot write")
    assert "--json" in errors[0]
