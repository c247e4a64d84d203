"""The training loop: `train(cfg)` runs setup, then epochs (train, evaluate, checkpoint), then finish.

`mt-train` and `accelerate launch -m mt_scale.train` run it; each batch is one call of the step in
mt_scale.step; the evaluations are mt_scale.train_eval's. The design (what runs where, resume,
pre-emption) is in docs/design.md.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
from mt_scale.config import Config
from mt_scale.errors import MtScaleError
from mt_scale.loss_window import LossWindow
from mt_scale.preemption import StopRequest, next_batch
from mt_scale.report import (
    CURVES_NAME,
    TRACKER_PROJECT,
    MetricsWriter,
    build_report,
    eval_line,
    flat_hparams,
    open_run_dir,
    plot_curves,
    release_run_dir,
    summary_line,
    trackers,
    write_or_fail,
    write_report,
)
from mt_scale.train_eval import LabelCheck, evaluate_run
from shard_tools.files import atomic_write

if TYPE_CHECKING:
    from accelerate import Accelerator
    from tqdm import tqdm

    from mt_scale.device_plan import DevicePlan
    from mt_scale.step import MeanTeacherStep, TrainingParts
    from pipelines import Loaders

CONFIG_NAME = "config.yaml"


@dataclass
class TrainResult:
    """report.json's content (main process; after a stop: where and why), the run folder, the trained
    EMA teacher and the last evaluation (the same on every rank)."""

    report: dict[str, Any]
    run_dir: Path
    teacher: torch.nn.Module
    final: dict[str, float]


@dataclass
class Run:
    """Everything one run holds from setup to finish."""

    cfg: Config  # this rank's share (resolve_for_devices)
    resolved: dict[str, Any]  # the config as given: what config.yaml and report.json hold
    plan: DevicePlan
    accelerator: Accelerator
    run_dir: Path
    stop: StopRequest
    keep: int
    progress: bool
    stop_after_steps: int | None
    loaders: Loaders
    parts: TrainingParts
    step: MeanTeacherStep
    state: TrainState
    metrics: MetricsWriter | None  # the main process's
    steps_per_epoch: int
    batches_per_epoch: int
    images_per_batch: int  # student rows per batch over all ranks
    labels: LabelCheck
    window: LossWindow = field(default_factory=LossWindow)
    last_eval: dict[str, float] = field(default_factory=dict)
    stopped_by: str | None = None  # "stop_after_steps" or the signal's name
    started: float = field(default_factory=time.perf_counter)

    @property
    def total_steps(self) -> int:
        return self.cfg.run.epochs * self.steps_per_epoch


def train(
    cfg: Config,
    *,
    resume: str | Path | None = None,
    keep: int | None = None,
    progress: bool = True,
    stop_after_steps: int | None = None,
    handle_sigterm: bool = False,
) -> TrainResult:
    """Run (or continue, with `resume`) one training run described by `cfg`.

    `keep` checkpoints are kept (None: run.keep_checkpoints). `stop_after_steps` checkpoints and stops
    there, as a pre-emption would. With `handle_sigterm` (what mt-train does), SIGTERM stops the run at
    the next step boundary with a checkpoint; the report then holds `stopped_by`, `stopped_at_step`
    and `checkpoint`. A run that fails before its first checkpoint removes the run folder it created.
    """
    from tqdm.auto import tqdm

    accelerator = _accelerator(cfg)
    run_dir = Path(cfg.run.output_dir)
    created = open_run_dir(accelerator, run_dir, resuming=resume is not None)
    stop = StopRequest().install() if handle_sigterm else StopRequest()
    try:
        keep = cfg.run.keep_checkpoints if keep is None else keep
        run = _setup(cfg, accelerator, stop, resume=resume, keep=keep, progress=progress,
                     stop_after_steps=stop_after_steps)  # fmt: skip
        show = accelerator.is_main_process and progress
        with tqdm(total=run.total_steps, initial=run.state.step, disable=not show, unit="step") as bar:
            while run.state.epoch < cfg.run.epochs and run.stopped_by is None:  # closed before an error line
                _train_epoch(run, bar)
                if run.stopped_by is None:
                    _end_epoch(run, bar)
        return _finish(run)
    except BaseException:
        if accelerator.is_main_process and created is not None and not checkpoint_dirs(run_dir):
            shutil.rmtree(created, ignore_errors=True)  # a run that failed before its first checkpoint
        raise
    finally:
        stop.restore()
        release_run_dir(run_dir)  # the folder's lock (main process); a killed run's goes with the process


def _accelerator(cfg: Config) -> Accelerator:
    from accelerate import Accelerator

    if not cfg.run.shards:
        raise MtScaleError(
            "run.shards is empty: pack a shard set with mt-shard pack, then --set run.shards=DIR"
        )
    if cfg.run.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise MtScaleError("run.mixed_precision=fp16 needs a CUDA GPU; use bf16 or no on this machine")
    return Accelerator(
        # Launched as several processes on a machine with no GPU: run them on CPU with gloo.
        cpu=_no_accelerator() and "LOCAL_RANK" in os.environ,
        mixed_precision=cfg.run.mixed_precision,
        gradient_accumulation_steps=cfg.run.grad_accum_steps,
        step_scheduler_with_optimizer=False,  # the schedule is per optimizer step; the step function steps it
        log_with=trackers(cfg.run.log_with, Path(cfg.run.output_dir)),
        project_dir=cfg.run.output_dir,
    )


def _setup(
    cfg: Config,
    accelerator: Accelerator,
    stop: StopRequest,
    *,
    resume: str | Path | None,
    keep: int,
    progress: bool,
    stop_after_steps: int | None,
) -> Run:
    """This rank's config, loaders, models and step; the checkpoint resumed; config.yaml and logs opened."""
    from mt_scale.config import config_to_dict, config_to_yaml
    from mt_scale.device_plan import plan_devices, resolve_for_devices
    from mt_scale.memory import agreed_device_limit
    from mt_scale.step import MeanTeacherStep, create_training
    from pipelines import build_loaders

    resolved, resolved_yaml = config_to_dict(cfg), config_to_yaml(cfg)
    measured = agreed_device_limit(cfg, accelerator)
    plan = plan_devices(cfg, accelerator.num_processes, measured)
    cfg = resolve_for_devices(cfg, accelerator.num_processes, accelerator.process_index, measured)
    accelerator.gradient_accumulation_steps = cfg.run.grad_accum_steps
    accelerator.print(plan.summary())
    loaders = build_loaders(
        cfg.run.shards, cfg.data, rank=accelerator.process_index, world_size=accelerator.num_processes
    )
    steps_per_epoch = _steps_per_epoch(cfg, accelerator, loaders)
    parts = create_training(cfg, accelerator, loaders.num_classes, steps_per_epoch)
    state = TrainState(world_size=accelerator.num_processes, class_names=list(loaders.class_names))
    if resume is not None:
        checkpoint = resolve_checkpoint(resume, Path(cfg.run.output_dir))
        load_checkpoint(accelerator, checkpoint, state, loaders, parts.teacher, model_name=cfg.model.name,
                        num_classes=loaders.num_classes, epochs=cfg.run.epochs,
                        steps_per_epoch=steps_per_epoch)  # fmt: skip
        accelerator.print(f"resumed from {checkpoint} at step {state.step} (epoch {state.epoch})")
    metrics = None
    if accelerator.is_main_process:
        atomic_write(Path(cfg.run.output_dir) / CONFIG_NAME, resolved_yaml)
        metrics = MetricsWriter(cfg.run.output_dir, resume_step=state.step if resume is not None else None)
    accelerator.init_trackers(TRACKER_PROJECT, config=flat_hparams(resolved))
    # Supervised-only, the student takes the labeled rows alone (which may differ by one between ranks).
    images = plan.device_batch * plan.world_size if cfg.mt.enabled else sum(plan.labeled_per_rank)
    step = MeanTeacherStep.create(cfg, accelerator, *parts)
    accelerator.print(f"step: {step.mode}")
    return Run(
        cfg=cfg, resolved=resolved, plan=plan, accelerator=accelerator, run_dir=Path(cfg.run.output_dir),
        stop=stop, keep=keep, progress=progress, stop_after_steps=stop_after_steps, loaders=loaders,
        parts=parts, step=step, state=state, metrics=metrics,
        steps_per_epoch=steps_per_epoch, batches_per_epoch=steps_per_epoch * cfg.run.grad_accum_steps,
        images_per_batch=images, labels=LabelCheck(loaders.num_classes, cfg.run.shards, "training"),
    )  # fmt: skip


def _steps_per_epoch(cfg: Config, accelerator: Accelerator, loaders: Loaders) -> int:
    # Every rank must take the same number of steps (DDP); the shortest rank decides.
    batches = int(accelerator.gather(torch.tensor([len(loaders.train)], device=accelerator.device)).min())
    steps = batches // cfg.run.grad_accum_steps
    if steps < 1:
        raise MtScaleError(
            f"{cfg.run.shards}: one epoch gives {batches} batches per rank, fewer than "
            f"run.grad_accum_steps={cfg.run.grad_accum_steps}; lower data.batch_size or run.grad_accum_steps"
        )
    return steps


def _train_epoch(run: Run, bar: tqdm) -> None:
    """The rest of the current epoch, one step per batch; stops early at an agreed step boundary.

    Between log steps nothing here waits for the device: the loss terms add up on the device, the
    labels are checked on the host before the step moves them, and the divergence check and the
    ranks' agreement on a stop request come at log steps (and before every checkpoint).
    """
    state = run.state
    run.loaders.set_epoch(state.epoch)
    batches = iter(run.loaders.train)
    while state.batch_in_epoch < run.batches_per_epoch:
        started = time.perf_counter()
        batches = _train_batch(run, batches, bar)
        # loading, the step, the loss bookkeeping and logging: the end-to-end rate report.json gives
        state.train_seconds += time.perf_counter() - started
        if run.stopped_by is not None:
            return
    state.epoch += 1
    state.batch_in_epoch = 0


def _train_batch(run: Run, batches: Iterator[dict], bar: tqdm) -> Iterator[dict]:
    """One batch: load it, check its labels, step, add up its losses; at a step boundary, log and decide
    whether to stop. Returns the iterator to continue with."""
    state, cfg = run.state, run.cfg
    batch, batches = next_batch(batches, run.loaders, run.stop)
    epoch = state.epoch + state.batch_in_epoch / run.batches_per_epoch
    run.labels.check(batch["label"][: run.step.student_rows])
    out = run.step(batch, state.step, epoch)
    state.batch_in_epoch += 1
    state.images_seen += run.images_per_batch
    run.window.add(out.losses)
    if not out.stepped:
        return batches
    state.step = out.step
    bar.update(1)
    at_log_step = state.step % cfg.run.log_every_steps == 0 or state.step == run.total_steps
    if at_log_step:
        _check_window(run)
        _log_train(run, out.consistency_weight, epoch, bar)
    # A step boundary: every rank takes the same decision here (the SIGTERM flag is all-reduced at log
    # steps; a single process reads its own flag every step).
    if run.stop_after_steps is not None and state.step >= run.stop_after_steps:
        run.stopped_by = "stop_after_steps"
    elif run.stop.agreed(run.accelerator, exchange=at_log_step):
        run.stopped_by = run.stop.signal_name or "SIGTERM"  # signalled on another rank
    return batches


def _check_window(run: Run) -> None:
    """One host read of the window: stop with one line if a loss term went non-finite or a label was bad."""
    run.labels.raise_if_bad()
    if not run.window.finite():
        total = run.window.read().get("total")
        raise MtScaleError(
            f"loss is {total} by step {run.state.step}: training diverged; lower optim.lr "
            "(or mt.consistency_weight) in the preset"
        )


def _log_train(run: Run, weight: float, epoch: float, bar: tqdm) -> None:
    row = {
        "step": run.state.step,
        "epoch": epoch,
        "kind": "train",
        **run.window.means(),
        "consistency_weight": weight,
        "lr": run.parts.optimizer.param_groups[0]["lr"],
        "images_per_sec": run.window.images_per_sec(run.images_per_batch),
    }
    if run.metrics is not None:
        run.metrics.write(row)
    logged = {f"train/{k}": v for k, v in row.items() if k not in ("step", "kind")}
    run.accelerator.log(logged, step=run.state.step)
    bar.set_postfix(loss=f"{row['loss']:.3f}", cons=f"{row['consistency_loss']:.3f}", lr=f"{row['lr']:.3g}",
                    img_s=f"{row['images_per_sec']:.0f}")  # fmt: skip
    run.window.reset()


def _end_epoch(run: Run, bar: tqdm) -> None:
    """After an epoch (not the last: `_finish` ends the run): evaluate and checkpoint when due."""
    done, settings = run.state.epoch, run.cfg.run
    if done >= settings.epochs:
        return
    if settings.eval_every_epochs and done % settings.eval_every_epochs == 0:
        run.last_eval = _evaluate(run)
        if run.accelerator.is_main_process and run.progress:
            bar.write(eval_line(run.state.step, run.last_eval))
    if settings.checkpoint_every_epochs and done % settings.checkpoint_every_epochs == 0:
        _checkpoint(run)


def _finish(run: Run) -> TrainResult:
    """The one way out: a final checkpoint; a completed run also evaluates, exports and reports."""
    wall = time.perf_counter() - run.started
    if run.stopped_by is None:
        run.last_eval = _evaluate(run)
    checkpoint = _checkpoint(run)
    report: dict[str, Any] = {}
    if run.stopped_by is not None:
        if run.stopped_by == "stop_after_steps":
            run.accelerator.print(f"stopped after step {run.state.step}; checkpoint {checkpoint}")
        report = {"stopped_at_step": run.state.step, "checkpoint": str(checkpoint),
                  "stopped_by": run.stopped_by}  # fmt: skip
    elif run.accelerator.is_main_process:
        report = _write_outputs(run, wall)
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()  # also ends the process group: no collective after this
    return TrainResult(report=report, run_dir=run.run_dir, teacher=run.parts.teacher, final=run.last_eval)


def _write_outputs(run: Run, wall: float) -> dict[str, Any]:
    """The exported teacher, report.json and curves.png (main process); returns the report."""
    cfg, run_dir, teacher = run.cfg, run.run_dir, run.parts.teacher
    export_path = write_or_fail(run_dir / EXPORT_NAME, lambda: export_teacher(teacher, run_dir / EXPORT_NAME))
    report = build_report(
        cfg, run_dir, run.state, run.last_eval, total_steps=run.total_steps, wall_seconds=wall,
        world_size=run.accelerator.num_processes, device=str(run.accelerator.device),
        export_path=export_path, num_classes=run.loaders.num_classes,
    )  # fmt: skip
    report["config"] = run.resolved
    report["batch"] = run.plan.as_dict()  # what the run used: per device, accumulation, global, lr
    report["step_mode"] = run.step.mode  # CUDA graph or eager, and why
    write_report(run_dir, report)
    title = f"{cfg.preset or 'run'}: {'Mean Teacher' if cfg.mt.enabled else 'supervised'}"
    write_or_fail(run_dir / CURVES_NAME, lambda: plot_curves(run_dir, title=title))
    print(summary_line(report), flush=True)
    return report


def _evaluate(run: Run) -> dict[str, float]:
    return evaluate_run(run.accelerator, run.parts.student, run.parts.teacher, run.loaders, run.cfg,
                        step=run.state.step, epoch=run.state.step / run.steps_per_epoch, stop=run.stop,
                        metrics=run.metrics)  # fmt: skip


def _checkpoint(run: Run) -> Path:
    _check_window(run)  # never checkpoint a diverged run
    return save_checkpoint(run.accelerator, run.run_dir, run.state, run.loaders, run.parts.teacher,
                           keep=run.keep, model_name=run.cfg.model.name,
                           num_classes=run.loaders.num_classes)  # fmt: skip


def _no_accelerator() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return not torch.cuda.is_available() and not (mps is not None and mps.is_available())


if __name__ == "__main__":  # python -m mt_scale.train, accelerate launch -m mt_scale.train: mt-train
    import runpy

    # mt-train's module runs as the main program; it imports this module (as mt_scale.train), not back.
    runpy.run_module("mt_scale.cli", run_name="__main__")
