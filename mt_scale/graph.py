"""The Mean Teacher step captured as CUDA graphs and replayed (`model.cuda_graph`, on by default).

At the paper's 25-50 rows per device a ResNet step is bound by the host launching thousands of small
kernels. PyTorch's whole-network capture records the step once (both forwards, the losses, backward,
the optimizer step and the EMA update) and replays it with one launch. What changes from step to
step lives in device tensors the graph reads: the input rows (copied into static buffers), the
consistency weight, the EMA keep-fraction and the learning rate (SGD's fused kernel takes it as a
tensor while capturing; the param groups keep their floats, so checkpoints and schedulers are as in
eager mode). With gradient accumulation each micro-batch position of a window has its own graph, the
first writing the gradients and the others adding to them, all in one memory pool.

Capture follows a warm-up of eager steps (DDP needs 11 before its collectives can be captured; the
last warm-up window runs on a side stream, as PyTorch's recipe does). Where capture is impossible
the step stays eager, said in one line: no CUDA device, an optimizer whose step reads its LR on the
host, fp16 loss scaling, torch.compile, a failed capture, or a batch of another shape.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

import torch

from mt_scale.teacher import ema_alpha

if TYPE_CHECKING:
    from mt_scale.config import Config

WARMUP_WINDOWS = 11  # eager optimizer steps before capture (DDP's requirement for captured collectives)


class GraphableStep(Protocol):
    """What the graphs use of mt_scale.step.MeanTeacherStep (which builds them)."""

    accelerator: Any
    student: torch.nn.Module
    optimizer: Any
    scheduler: Any
    mt: Any
    student_rows: int

    def inputs(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def compute(self, inputs: Mapping[str, torch.Tensor], weight: float | torch.Tensor,
                ema_alpha: torch.Tensor | None = None) -> dict[str, torch.Tensor]: ...  # fmt: skip

    def eager(self, batch: Mapping[str, torch.Tensor], step_index: int, weight: float) -> Any: ...


@dataclasses.dataclass
class Replayed:
    """What one replay did: the loss terms (the graph's own tensors), the step count, whether it stepped."""

    losses: dict[str, torch.Tensor]
    step: int
    stepped: bool


def graph_unsupported(step: GraphableStep, cfg: Config) -> str | None:
    """Why `step` cannot be captured here (the eager line's reason), or None when it can."""
    if step.accelerator.device.type != "cuda":
        return "no CUDA device"
    if cfg.model.compile:
        return "model.compile=true: torch.compile runs the step instead"
    if cfg.run.mixed_precision == "fp16":
        return "fp16 loss scaling reads the device every step; use bf16"
    optimizer = getattr(step.optimizer, "optimizer", step.optimizer)  # under Accelerate's wrapper
    if type(optimizer) is not torch.optim.SGD:
        return f"optim.name={cfg.optim.name}: only SGD's fused step takes its LR from the device"
    return None


@dataclasses.dataclass
class Captured:
    """One micro-batch position's graph, the static inputs it reads and the loss terms it writes."""

    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]
    losses: dict[str, torch.Tensor]


class StepGraphs:
    """Captures `step` once per input shape and replays it; returns None where the call runs eager."""

    def __init__(self, step: GraphableStep) -> None:
        self.step = step
        device = step.accelerator.device
        self.window = step.accelerator.gradient_accumulation_steps
        self.weight = torch.zeros((), device=device)
        self.alpha = torch.zeros((), device=device)
        self.lrs = [torch.zeros((), device=device) for _ in self._groups()]
        # The eager steps (warm-up, other shapes) run the kernels the graph replays: SGD's fused step
        # and the EMA with its keep-fraction on the device, so a run resumed at any step (which warms
        # up again) computes what an unbroken one does.
        for group in self._groups():
            group.update(fused=True, foreach=False)
        self.graphs: dict[tuple, list[Captured]] = {}  # input shapes -> one graph per micro-batch position
        self.calls = 0
        self.reason: str | None = None  # why capture stopped being tried (a failure)
        self._said: set[tuple] = set()

    @property
    def mode(self) -> str:
        if self.reason is not None:
            return f"eager ({self.reason})"
        return f"CUDA graph (captured after {WARMUP_WINDOWS} eager optimizer steps)"

    def _groups(self) -> list[dict]:
        return getattr(self.step.optimizer, "optimizer", self.step.optimizer).param_groups

    def __call__(self, batch: Mapping[str, torch.Tensor], step_index: int, weight: float) -> Any:
        """The step's result (a Replayed, or the eager step's own on the warm-up's side stream), or
        None where the caller runs the step eager."""
        position = self.calls % self.window
        self.calls += 1
        if self.reason is not None:
            return None
        shapes = tuple((name, tuple(value[: self.step.student_rows].shape))
                       for name, value in sorted(batch.items()) if isinstance(value, torch.Tensor))  # fmt: skip
        captured = self.graphs.get(shapes)
        if captured is None:
            if self.calls <= WARMUP_WINDOWS * self.window:
                if self.calls > (WARMUP_WINDOWS - 1) * self.window:
                    return self._on_side_stream(batch, step_index, weight)
                return None
            if self.graphs:
                self._say_once(shapes, f"a batch of shape {dict(shapes)} runs eager (the graph holds another shape)")
                return None
            if position != 0:
                return None  # capture at the start of an accumulation window
            captured = self._capture(batch, shapes)
            if captured is None:
                return None
        return self._replay(captured[position], batch, step_index, weight)

    def _on_side_stream(self, batch: Mapping[str, torch.Tensor], step_index: int, weight: float) -> Any:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = self.step.eager(batch, step_index, weight)
        torch.cuda.current_stream().wait_stream(side)
        return out

    def _capture(self, batch: Mapping[str, torch.Tensor], shapes: tuple) -> list[Captured] | None:
        """One graph per micro-batch position, recorded (not run) with the optimizer on its fused path."""
        step, accelerator = self.step, self.step.accelerator
        saved_lrs = [group["lr"] for group in self._groups()]
        saved_count = accelerator.step
        inputs = {name: value.clone() for name, value in step.inputs(batch).items()}
        captured: list[Captured] = []
        pool = None
        try:
            for group, lr in zip(self._groups(), self.lrs, strict=True):
                group["lr"] = lr  # read by the fused kernel from the device at each replay
            step.optimizer.zero_grad(set_to_none=True)  # the first position's backward writes fresh gradients
            torch.cuda.synchronize()
            for _ in range(self.window):
                graph = torch.cuda.CUDAGraph()
                # thread_local: the loader's threads (pinning memory, DALI) go on with their own CUDA work
                with accelerator.accumulate(step.student), torch.cuda.graph(
                    graph, pool=pool, capture_error_mode="thread_local"
                ):
                    losses = step.compute(inputs, self.weight, self.alpha)
                pool = graph.pool()
                captured.append(Captured(graph, inputs, losses))
        except Exception as exc:  # capture is an optimisation: any failure leaves the step eager
            self.reason = f"capture failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            accelerator.print(f"step: {self.mode}")
            captured = []
        finally:
            for group, lr in zip(self._groups(), saved_lrs, strict=True):
                group["lr"] = lr
            accelerator.step = saved_count
        if not captured:
            step.optimizer.zero_grad(set_to_none=True)
            return None
        self.graphs[shapes] = captured
        return captured

    def _replay(
        self, captured: Captured, batch: Mapping[str, torch.Tensor], step_index: int, weight: float
    ) -> Replayed:
        step = self.step
        for name, static in captured.inputs.items():
            static.copy_(batch[name][: step.student_rows], non_blocking=True)
        self.weight.fill_(weight)
        self.fill_alpha(step_index + 1)
        for group, lr in zip(self._groups(), self.lrs, strict=True):
            lr.fill_(group["lr"])
        with step.accelerator.accumulate(step.student):  # keeps Accelerate's micro-batch count
            captured.graph.replay()
        stepped = step.accelerator.sync_gradients
        if stepped:
            step.scheduler.step()
            step_index += 1
        return Replayed(captured.losses, step_index, stepped)

    def fill_alpha(self, step_index: int) -> torch.Tensor:
        """The EMA keep-fraction after optimizer step `step_index`, written to the device tensor."""
        self.alpha.fill_(ema_alpha(self.step.mt.ema_decay, step_index))
        return self.alpha

    def _say_once(self, key: tuple, message: str) -> None:
        if key not in self._said:
            self._said.add(key)
            self.step.accelerator.print(f"step: {message}")
