"""The Mean Teacher training loop: `mt-train` / `accelerate launch -m mt_scale.train`.

One straight loop (the reference's main.train): per batch, the teacher (EMA of the student, never
DDP-wrapped, in train mode) sees the teacher view under no_grad; the student sees the student view;
the class loss over the labeled rows plus the ramped consistency and logit-distance terms (each
divided by the whole minibatch size) is backpropagated; after each optimizer step the step count
goes up and the teacher moves towards the student. Accelerate places the models, wraps the student
in DDP across processes, applies bf16/fp16 autocast and gradient accumulation; nothing here
creates process groups. The loaders are NOT prepared by Accelerate: the pipelines already give
each rank its own shards (preparing them would shard a second time).

Supervised-only (`mt.enabled=false`) shares every line: the consistency weight is 0 and the
student (and teacher) see only the L labeled rows of each batch, so the baseline takes the same
steps over the same labeled stream with the same schedules; the teacher is still the EMA of the
student and is evaluated too. (A config with data.labeled_per_batch == data.batch_size gives
all-labeled batches directly; the labeled split then defines the epoch.)

Failures are one line (main): a user error, a bad checkpoint or an OS error on the run folder exit
with status 2, Ctrl-C with 130; a run that fails before its first checkpoint removes the run folder
it created. SIGTERM (pre-emption) writes a checkpoint at the next step boundary, all ranks agreeing
on the step, and exits with 143 (mt_scale.preemption); `--resume` then continues exactly.

Batch sizes and `optim.lr` are global or per device (`run.batch_scope`); `resolve_for_devices`
gives this rank's micro-batch, the gradient accumulation and the peak LR, and report.json records them.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mt_scale.checkpoint import (
    EXPORT_NAME,
    TrainState,
    checkpoint_dirs,
    export_teacher,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from mt_scale.errors import MtScaleError, os_error_message
from mt_scale.evaluate import evaluate
from mt_scale.preemption import EXIT_INTERRUPTED, EXIT_PREEMPTED, StopRequest, next_batch
from mt_scale.report import (
    CURVES_NAME,
    METRICS_NAME,
    REPORT_NAME,
    MetricsWriter,
    atomic_write_text,
    build_report,
    eval_line,
    flat_hparams,
    plot_curves,
    prepare_run_dir,
    summary_line,
    write_report,
    written,
)

TENSORBOARD_DIR = "tensorboard"
CONFIG_NAME = "config.yaml"


@dataclass
class TrainResult:
    """What `train` hands back on every rank.

    `report` is report.json's content (empty on ranks other than the main one); `final` is the last
    evaluation (the same numbers on every rank); `teacher` is the trained EMA model.
    """

    report: dict[str, Any]
    run_dir: Path
    teacher: torch.nn.Module
    final: dict[str, float]


def build_parser(prog: str = "mt-train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train a Mean Teacher (or supervised-only) image classifier on a shard set. "
        "Many processes/GPUs/nodes: accelerate launch [flags] -m mt_scale.train <same arguments>.",
    )
    parser.add_argument("--preset", help="preset name (mt_scale/presets/*.yaml)")
    parser.add_argument("--config", help="YAML file applied over the preset")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one field, e.g. --set run.epochs=10 --set mt.enabled=false (repeatable)",
    )  # fmt: skip
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    parser.add_argument(
        "--resume", nargs="?", const="", default=None, metavar="DIR",
        help="continue from the latest checkpoint of run.output_dir, or of DIR (a run folder or a checkpoint)",
    )  # fmt: skip
    parser.add_argument("--keep", type=int, default=None, metavar="N", help="keep the newest N checkpoints (0 = all)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--stop-after-steps", type=int, default=None, metavar="N",
        help="checkpoint and stop after N optimizer steps (as if the job were pre-empted there)",
    )  # fmt: skip
    return parser


def resolve_config(args: argparse.Namespace) -> Any:
    from mt_scale.config import load_config

    return load_config(preset=args.preset, config_file=args.config, overrides=list(args.overrides))


def main(argv: list[str] | None = None) -> int:
    """Entry point shared by `mt-train` and `python -m mt_scale.train`; returns the exit status.

    0: done (or stopped by --stop-after-steps); 2: a user error, one line on stderr; 130: Ctrl-C;
    143 (EXIT_PREEMPTED): SIGTERM, a checkpoint was written, continue with --resume.
    """
    from pipelines.errors import PipelineError
    from shard_tools.format import ShardFormatError

    args = build_parser().parse_args(argv)
    try:
        cfg = resolve_config(args)
        if args.print_config:
            from mt_scale.config import config_to_yaml

            sys.stdout.write(config_to_yaml(cfg))
            return 0
        result = train(
            cfg,
            resume=args.resume,
            keep=args.keep,
            progress=not args.no_progress,
            stop_after_steps=args.stop_after_steps,
            handle_sigterm=True,
        )
    except (MtScaleError, PipelineError, ShardFormatError) as exc:
        _stderr_line(f"error: {exc}")
        return 2
    except OSError as exc:
        _stderr_line(f"error: {os_error_message(exc)}; choose a writable run.output_dir with free space")
        return 2
    except KeyboardInterrupt:
        _stderr_line("interrupted (Ctrl-C); checkpoints already written are kept: continue with --resume")
        return EXIT_INTERRUPTED
    if result.report.get("stopped_by") == "SIGTERM":
        _stderr_line(
            f"stopped by SIGTERM after step {result.report['stopped_at_step']}; checkpoint "
            f"{result.report['checkpoint']} written: continue with --resume"
        )
        return EXIT_PREEMPTED
    return 0


def _stderr_line(text: str) -> None:
    # Every rank hits the same error or signal; one line from the first process is enough.
    if os.environ.get("RANK", "0") == "0":
        message = " ".join(str(text).split())
        print(f"mt-train: {message}", file=sys.stderr, flush=True)


def train(
    cfg: Any,
    *,
    resume: str | Path | None = None,
    keep: int | None = None,
    progress: bool = True,
    stop_after_steps: int | None = None,
    handle_sigterm: bool = False,
) -> TrainResult:
    """Run (or continue, with `resume`) one training run described by `cfg`; see the module docstring.

    With `handle_sigterm` (what mt-train does), SIGTERM stops the run at the next step boundary with a
    checkpoint; the result's report then holds `stopped_by: "SIGTERM"`, `stopped_at_step` and `checkpoint`.
    """
    from accelerate import Accelerator

    if not cfg.run.shards:
        raise MtScaleError("run.shards is empty: pack a shard set with mt-shard pack, then --set run.shards=DIR")
    run_dir = Path(cfg.run.output_dir)
    keep = cfg.run.keep_checkpoints if keep is None else keep
    if cfg.run.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise MtScaleError("run.mixed_precision=fp16 needs a CUDA GPU; use bf16 or no on this machine")
    accelerator = Accelerator(
        # Launched as several processes on a machine with no GPU: run them on CPU with gloo.
        cpu=_no_accelerator() and "LOCAL_RANK" in os.environ,
        mixed_precision=cfg.run.mixed_precision,
        gradient_accumulation_steps=cfg.run.grad_accum_steps,
        step_scheduler_with_optimizer=False,  # the schedule is per optimizer step; we step it ourselves
        log_with="tensorboard",
        project_dir=str(run_dir),
    )
    created = _prepare_run_dir(accelerator, run_dir, resuming=resume is not None)
    stop = StopRequest().install() if handle_sigterm else StopRequest()
    try:
        return _run(cfg, accelerator, run_dir, stop, resume=resume, keep=keep, progress=progress,
                    stop_after_steps=stop_after_steps)
    except BaseException:
        if accelerator.is_main_process and created is not None and not checkpoint_dirs(run_dir):
            # a run that failed before its first checkpoint leaves nothing behind
            shutil.rmtree(created, ignore_errors=True)
        raise
    finally:
        stop.restore()


def _run(
    cfg: Any,
    accelerator: Any,
    run_dir: Path,
    stop: StopRequest,
    *,
    resume: str | Path | None,
    keep: int,
    progress: bool,
    stop_after_steps: int | None,
) -> TrainResult:
    from tqdm.auto import tqdm

    from mt_scale.config import config_to_dict, config_to_yaml, plan_devices, resolve_for_devices
    from mt_scale.step import MeanTeacherStep, create_training
    from mt_scale.teacher import sync_teacher_buffers
    from pipelines import build_loaders

    main_process = accelerator.is_main_process
    resolved = config_to_dict(cfg)  # as given: what config.yaml and report.json hold
    resolved_yaml = config_to_yaml(cfg)
    device_plan = plan_devices(cfg, accelerator.num_processes)
    cfg = resolve_for_devices(cfg, accelerator.num_processes, accelerator.process_index)
    accelerator.gradient_accumulation_steps = cfg.run.grad_accum_steps
    accelerator.print(f"batch: {device_plan.global_batch} per step ({device_plan.global_labeled} labeled) = "
                      f"{device_plan.world_size} devices x {device_plan.grad_accum_steps} micro-batches x "
                      f"{device_plan.device_batch}; peak lr {device_plan.lr:g}")
    loaders = build_loaders(
        cfg.run.shards, cfg.data, rank=accelerator.process_index, world_size=accelerator.num_processes
    )
    num_classes = loaders.num_classes
    # Every rank must take the same number of steps (DDP); the shortest rank decides.
    batches_per_epoch = int(
        accelerator.gather(torch.tensor([len(loaders.train)], device=accelerator.device)).min()
    )
    accum = cfg.run.grad_accum_steps
    steps_per_epoch = batches_per_epoch // accum
    if steps_per_epoch < 1:
        raise MtScaleError(
            f"{cfg.run.shards}: one epoch gives {batches_per_epoch} batches per rank, fewer than "
            f"run.grad_accum_steps={accum}; lower data.batch_size or run.grad_accum_steps"
        )
    batches_per_epoch = steps_per_epoch * accum
    total_steps = cfg.run.epochs * steps_per_epoch

    parts = create_training(cfg, accelerator, num_classes, steps_per_epoch)
    student, teacher, optimizer, scheduler = parts
    train_step = MeanTeacherStep.create(cfg, accelerator, *parts)
    state = TrainState(world_size=accelerator.num_processes, class_names=list(loaders.class_names))
    model_id = {"model_name": cfg.model.name, "num_classes": num_classes}

    def checkpoint_now() -> Path:
        return save_checkpoint(accelerator, run_dir, state, loaders, teacher, keep=keep, **model_id)

    if resume is not None:
        checkpoint = resolve_checkpoint(resume, run_dir)
        load_checkpoint(accelerator, checkpoint, state, loaders, teacher, **model_id)
        accelerator.print(f"resumed from {checkpoint} at step {state.step} (epoch {state.epoch})")
    if main_process:
        atomic_write_text(run_dir / CONFIG_NAME, resolved_yaml)
        metrics = MetricsWriter(run_dir, resume_step=state.step if resume is not None else None)
    accelerator.init_trackers(TENSORBOARD_DIR, config=flat_hparams(resolved))

    mean, std = tuple(cfg.data.mean), tuple(cfg.data.std)
    channels_last = bool(cfg.model.channels_last)
    # Supervised-only: the student (and teacher) take the labeled rows alone.
    student_rows = train_step.student_rows
    # over all ranks (labeled rows may differ by one between ranks under a global batch)
    images_per_batch = (device_plan.device_batch * device_plan.world_size if cfg.mt.enabled
                        else sum(device_plan.labeled_per_rank))
    last_eval: dict[str, float] = {}

    def run_eval() -> dict[str, float]:
        # BatchNorm statistics differ per rank until averaged; average so every rank scores one model.
        unwrapped = accelerator.unwrap_model(student)
        sync_teacher_buffers(unwrapped)
        result: dict[str, float] = {}
        for name, model in (("student", unwrapped), ("teacher", teacher)):
            try:
                scores = evaluate(model, checked_val(), accelerator, mean=mean, std=std, channels_last=channels_last)
            except MtScaleError:
                raise
            except Exception:
                if not stop.requested:
                    raise
                # the stop signal killed the val loader's workers: this rank evaluates again (its one
                # all-reduce comes at the end, so the ranks stay in step)
                scores = evaluate(model, checked_val(), accelerator, mean=mean, std=std, channels_last=channels_last)
            result.update({f"{name}_{key}": value for key, value in scores.items() if key != "count"})
            result["val_count"] = scores["count"]
        row = {"step": state.step, "epoch": state.step / steps_per_epoch, "kind": "eval", **result}
        if main_process:
            metrics.write(row)
        accelerator.log({f"val/{k}": v for k, v in result.items() if k != "val_count"}, step=state.step)
        return result

    def checked_val() -> Iterator[dict]:
        return _checked_labels(loaders.val, num_classes, cfg.run.shards, "val")

    window = {"loss": 0.0, "class": 0.0, "consistency": 0.0, "logit_distance": 0.0, "teacher_class": 0.0}
    window_batches, window_start, stopped_by = 0, time.perf_counter(), None
    run_start = time.perf_counter()
    student.train()
    teacher.train()
    bar = tqdm(total=total_steps, initial=state.step, disable=not (main_process and progress), unit="step")
    with bar:  # closed before any error line is printed
        while state.epoch < cfg.run.epochs and stopped_by is None:
            loaders.set_epoch(state.epoch)
            batches = iter(loaders.train)
            while state.batch_in_epoch < batches_per_epoch:
                batch_start = time.perf_counter()
                batch, batches = next_batch(batches, loaders, stop)
                epoch_position = state.epoch + state.batch_in_epoch / batches_per_epoch
                _checked_label_rows(batch["label"][:student_rows], num_classes, cfg.run.shards, "training")
                out = train_step(batch, state.step, epoch_position)
                weight, losses = out.consistency_weight, out.losses
                state.batch_in_epoch += 1
                state.images_seen += images_per_batch
                state.train_seconds += time.perf_counter() - batch_start  # loading included: end-to-end rate
                for key, value in losses.items():
                    window["loss" if key == "total" else key] += float(value.detach())
                window_batches += 1
                if not out.stepped:
                    continue
                state.step = out.step
                if not math.isfinite(window["loss"]):
                    raise MtScaleError(
                        f"loss is {window['loss']} at step {state.step}: training diverged; lower optim.lr "
                        "(or mt.consistency_weight) in the preset"
                    )
                bar.update(1)
                if state.step % cfg.run.log_every_steps == 0 or state.step == total_steps:
                    elapsed = max(time.perf_counter() - window_start, 1e-9)
                    row = {key: value / window_batches for key, value in window.items()}
                    row = {
                        "step": state.step,
                        "epoch": epoch_position,
                        "kind": "train",
                        "loss": row["loss"],
                        "class_loss": row["class"],
                        "consistency_loss": row["consistency"],
                        "logit_distance_loss": row["logit_distance"],
                        "teacher_class_loss": row["teacher_class"],
                        "consistency_weight": weight,
                        "lr": optimizer.param_groups[0]["lr"],
                        "images_per_sec": window_batches * images_per_batch / elapsed,
                    }
                    if main_process:
                        metrics.write(row)
                    accelerator.log(
                        {f"train/{k}": v for k, v in row.items() if k not in ("step", "kind")}, step=state.step
                    )
                    bar.set_postfix(
                        loss=f"{row['loss']:.3f}", cons=f"{row['consistency_loss']:.3f}",
                        lr=f"{row['lr']:.3g}", img_s=f"{row['images_per_sec']:.0f}",
                    )  # fmt: skip
                    window = dict.fromkeys(window, 0.0)
                    window_batches, window_start = 0, time.perf_counter()
                # A step boundary: every rank takes the same decision here (the SIGTERM flag is all-reduced).
                if stop_after_steps is not None and state.step >= stop_after_steps:
                    stopped_by = "stop_after_steps"
                elif stop.agreed(accelerator):
                    stopped_by = stop.signal_name or "SIGTERM"  # signalled on another rank
                if stopped_by is not None:
                    break
            if stopped_by is not None:
                break
            state.epoch += 1
            state.batch_in_epoch = 0
            epoch_done = state.epoch
            if epoch_done < cfg.run.epochs and cfg.run.eval_every_epochs and epoch_done % cfg.run.eval_every_epochs == 0:
                last_eval = run_eval()
                if main_process and progress:
                    bar.write(eval_line(state.step, last_eval))
            if (
                epoch_done < cfg.run.epochs
                and cfg.run.checkpoint_every_epochs
                and epoch_done % cfg.run.checkpoint_every_epochs == 0
            ):
                checkpoint_now()
    wall = time.perf_counter() - run_start

    if stopped_by is not None:
        checkpoint = checkpoint_now()
        if stopped_by == "stop_after_steps":
            accelerator.print(f"stopped after step {state.step}; checkpoint {checkpoint}")
        report = {"stopped_at_step": state.step, "checkpoint": str(checkpoint), "stopped_by": stopped_by}
        accelerator.end_training()
        return TrainResult(report=report, run_dir=run_dir, teacher=teacher, final=last_eval)

    last_eval = run_eval()
    checkpoint_now()
    report: dict[str, Any] = {}
    if main_process:
        export_path = written(run_dir / EXPORT_NAME, lambda: export_teacher(teacher, run_dir / EXPORT_NAME))
        report = build_report(
            cfg, run_dir, state, last_eval, total_steps=total_steps, wall_seconds=wall,
            world_size=accelerator.num_processes, device=str(accelerator.device),
            export_path=export_path, num_classes=num_classes,
        )  # fmt: skip
        report["config"] = resolved
        report["batch"] = device_plan.as_dict()  # what the run used: per device, accumulation, global, lr
        write_report(run_dir, report)
        title = f"{cfg.preset or 'run'}: {'Mean Teacher' if cfg.mt.enabled else 'supervised'}"
        written(run_dir / CURVES_NAME, lambda: plot_curves(run_dir, title=title))
        print(summary_line(report), flush=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()  # also ends the process group: no collective after this
    return TrainResult(report=report, run_dir=run_dir, teacher=teacher, final=last_eval)


def _checked_label_rows(labels: torch.Tensor, num_classes: int, shards: str, split: str) -> torch.Tensor:
    """`labels` (-1 = unlabeled), after checking every one names a class of the shard set."""
    bad = (labels >= num_classes) | (labels < -1)
    if labels.numel() and bool(bad.any()):
        value = int(labels[bad][0])
        raise MtScaleError(
            f"{shards}: a {split} batch holds label {value}, but the manifest lists {num_classes} classes "
            f"(labels 0..{num_classes - 1}); the set is damaged or mixes shards of another set: "
            f"check it with mt-shard verify --decode {shards}"
        )
    return labels


def _checked_labels(batches: Iterable[dict], num_classes: int, shards: str, split: str) -> Iterator[dict]:
    for batch in batches:
        labels, valid = batch["label"], batch.get("valid")
        _checked_label_rows(labels[valid.bool()] if valid is not None else labels, num_classes, shards, split)
        yield batch


def _prepare_run_dir(accelerator: Any, run_dir: Path, *, resuming: bool) -> Path | None:
    """Create `run_dir` (main process); returns the topmost folder this created, None if it existed."""
    created = None
    if accelerator.is_main_process:
        if not resuming and checkpoint_dirs(run_dir):
            raise MtScaleError(
                f"{run_dir}: already holds a run with checkpoints; continue it with --resume or "
                "choose another folder with --set run.output_dir=DIR"
            )
        # a new run removes what one killed before its first checkpoint left
        leftovers = (METRICS_NAME, REPORT_NAME, CURVES_NAME, EXPORT_NAME, TENSORBOARD_DIR)
        created = prepare_run_dir(run_dir, remove=() if resuming else leftovers)
    accelerator.wait_for_everyone()
    return created


def _no_accelerator() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return not torch.cuda.is_available() and not (mps is not None and mps.is_available())


def _memory_error(exc: RuntimeError, cfg: Any) -> Exception:
    from mt_scale.step import memory_error

    return memory_error(exc, cfg.data.batch_size)


if __name__ == "__main__":
    sys.exit(main())
