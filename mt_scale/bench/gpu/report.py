"""The run's report: results, checks and timings, saved as JSON and as a Markdown table after every part."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from mt_scale.bench.gpu.plan import RESULT_KEYS, Plan


@dataclass
class Report:
    """Results, checks and timings of one run; saved (JSON + Markdown, atomically) after every part."""

    plan: Plan
    json_path: Path | None = None
    markdown_path: Path | None = None
    machine: dict = field(default_factory=dict)
    results: dict[str, dict] = field(default_factory=dict)
    checks: dict[str, dict] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    def result(
        self,
        key: str,
        value: float | None,
        unit: str,
        *,
        goal: str = "",
        meets: bool | None = None,
        **detail: Any,
    ) -> None:
        verdict = "" if meets is None else ("meets goal" if meets else "misses goal")
        if meets is not None and self.plan.dry_run:
            verdict = "n/a (dry run)"
        self.results[key] = {"value": value, "unit": unit, "goal": goal, "verdict": verdict, "detail": detail}

    def skip(self, key: str, reason: str, unit: str = "") -> None:
        self.results[key] = {
            "value": None,
            "unit": unit,
            "goal": "",
            "verdict": f"skipped: {reason}",
            "detail": {},
        }

    def check(self, name: str, passed: bool, **detail: Any) -> bool:
        self.checks[name] = {"passed": bool(passed), "detail": detail}
        return bool(passed)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def remaining(self) -> float:
        return self.plan.budget_s - self.elapsed()

    def as_dict(self) -> dict:
        results = {
            key: self.results.get(
                key, {"value": None, "unit": "", "goal": "", "verdict": "not run", "detail": {}}
            )
            for key in RESULT_KEYS
        }
        results.update({k: v for k, v in self.results.items() if k not in results})
        return {
            "kit": "mt-bench gpu", "dry_run": self.plan.dry_run, "machine": self.machine,
            "plan": asdict(self.plan), "results": results, "checks": self.checks,
            "timings_s": {k: round(v, 2) for k, v in self.timings_s.items()},
            "total_s": round(self.elapsed(), 1), "budget_s": self.plan.budget_s,
            "all_checks_passed": all(c["passed"] for c in self.checks.values()),  # of those that ran
        }  # fmt: skip

    def save(self) -> None:
        from shard_tools.files import atomic_write

        data = self.as_dict()
        if self.json_path is not None:
            atomic_write(self.json_path, json.dumps(data, indent=2, default=str) + "\n")
        if self.markdown_path is not None:
            atomic_write(self.markdown_path, markdown(data))


def _format(value: Any) -> str:
    if isinstance(value, str):
        return " ".join(value.split()).replace("|", "/")
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


def markdown(data: dict) -> str:
    """The run as Markdown: what ran where, the figures beside their goals, the checks."""
    machine = data["machine"]
    title = (
        "dry run on the CPU (tiny sizes: the figures mean nothing)"
        if data["dry_run"]
        else machine.get("card")
    )
    lines = [
        f"### mt-bench gpu: {title}", "",
        f"torch {machine.get('torch')} (CUDA {machine.get('cuda')}), DALI {machine.get('dali')}, timm "
        f"{machine.get('timm')}, Accelerate {machine.get('accelerate')}, Python {machine.get('python')}; "
        f"1-minute load {machine.get('load_1min_start')} at start, {machine.get('load_1min_end')} at end; "
        f"{data['total_s']:.0f} s (budget {data['budget_s']:.0f} s).", "",
        "| result | value | unit | goal | verdict |", "|---|---:|---|---|---|",
    ]  # fmt: skip
    for key, entry in data["results"].items():
        lines.append(
            f"| `{key}` | {_format(entry['value'])} | {entry['unit']} | {entry['goal']} "
            f"| {entry['verdict']} |"
        )
    lines += ["", "| check | passed | detail |", "|---|---|---|"]
    for name, entry in data["checks"].items():
        detail = "; ".join(
            f"{k}={_format(v)}"
            for k, v in entry["detail"].items()
            if k != "traceback" and not isinstance(v, dict) and (v or v == 0)
        )
        lines.append(f"| `{name}` | {'yes' if entry['passed'] else '**no**'} | {detail} |")
    return "\n".join(lines) + "\n"


def describe_machine(plan: Plan) -> dict:
    """The card, the library versions and the load: what decides the figures."""
    import torch

    versions = {}
    for key, dist in (
        ("dali", "nvidia-dali-cuda130"),
        ("dali", "nvidia-dali-cuda120"),
        ("timm", "timm"),
        ("accelerate", "accelerate"),
        ("webdataset", "webdataset"),
    ):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions.setdefault(key, metadata.version(dist))
    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not plan.dry_run else "cpu"
    memory = (
        round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        if torch.cuda.is_available() and not plan.dry_run
        else None
    )
    return {
        "card": card,
        "gpu_memory_gib": memory,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "load_1min_start": round(os.getloadavg()[0], 2),
        **versions,
    }
