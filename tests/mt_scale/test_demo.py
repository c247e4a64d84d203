"""The demo: its summary, table and plot; and (slow) Mean Teacher beating the baseline on digits."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mt_scale.demo import (
    LABELS_PER_CLASS,
    METHODS,
    SEEDS,
    SUMMARY_NAME,
    TARGET_RATIO,
    demo_jobs,
    ensure_digits_shards,
    format_table,
    mean_errors,
    plot_comparison,
    run_config,
    run_demo,
    teacher_error_ratio,
)
from shard_tools.manifest import read_manifest

SUMMARY = {
    "0": {
        "mean_teacher": {"teacher_top1_error": 0.05, "student_top1_error": 0.06},
        "supervised": {"teacher_top1_error": 0.10, "student_top1_error": 0.12},
    },
    "1": {
        "mean_teacher": {"teacher_top1_error": 0.07, "student_top1_error": 0.08},
        "supervised": {"teacher_top1_error": 0.14, "student_top1_error": 0.16},
    },
}


def test_summary_table_and_ratio() -> None:
    assert mean_errors(SUMMARY, "mean_teacher", "teacher_top1_error") == pytest.approx(0.06)
    assert mean_errors(SUMMARY, "supervised", "student_top1_error") == pytest.approx(0.14)
    assert teacher_error_ratio(SUMMARY) == pytest.approx(0.06 / 0.12)
    lines = format_table(SUMMARY).splitlines()
    assert len(lines) == 2 + 2 * len(METHODS) + len(METHODS)  # header, rule, 4 runs, 2 means
    assert lines[2].split() == ["0", "mean_teacher", "0.0500", "0.0600"]
    assert lines[-1].split() == ["mean", "supervised", "0.1200", "0.1400"]


def test_comparison_plot(tmp_path: Path) -> None:
    path = plot_comparison(SUMMARY, tmp_path / "comparison.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_run_config_differs_only_in_method_and_seed(tmp_path: Path) -> None:
    mt = run_config("mean_teacher", 1, tmp_path / "shards", tmp_path)
    sup = run_config("supervised", 1, tmp_path / "shards", tmp_path)
    assert mt.mt.enabled and not sup.mt.enabled
    assert (mt.run.seed, mt.data.seed) == (sup.run.seed, sup.data.seed) == (1, 1)
    assert mt.run.output_dir == str(tmp_path / "mean_teacher-seed1")
    sup.mt.enabled, sup.run.output_dir = True, mt.run.output_dir
    assert sup == mt  # every other setting shared


def test_existing_shards_are_reused(digits_shards: Path) -> None:
    before = (digits_shards / "manifest.json").stat().st_mtime_ns
    assert ensure_digits_shards(digits_shards, progress=False) == digits_shards
    assert (digits_shards / "manifest.json").stat().st_mtime_ns == before
    assert read_manifest(digits_shards).label_split["labels_per_class"] == LABELS_PER_CLASS


def test_jobs_default_to_the_cores_and_never_exceed_the_runs() -> None:
    assert demo_jobs(None, 6) == max(1, min(len(os.sched_getaffinity(0)), 6))
    assert (demo_jobs(4, 2), demo_jobs(0, 6), demo_jobs(3, 6)) == (2, 1, 3)


@pytest.mark.slow
def test_mean_teacher_beats_supervised_on_digits(tmp_path: Path) -> None:
    """`make demo` itself: 3 seeds, 50 labels; the teacher's error at most 0.7x the baseline's."""
    summary = run_demo(tmp_path / "demo", seeds=SEEDS, progress=False)
    written = json.loads((tmp_path / "demo" / SUMMARY_NAME).read_text())
    assert written == summary and sorted(written) == [str(s) for s in SEEDS]
    for runs in written.values():
        assert sorted(runs) == sorted(METHODS)
        for errors in runs.values():
            assert set(errors) == {"teacher_top1_error", "student_top1_error"}
            assert 0.0 <= errors["teacher_top1_error"] < 0.9  # well below chance (0.9)
    assert read_manifest(tmp_path / "demo" / "shards").split("train-labeled").num_samples == 50
    assert teacher_error_ratio(summary) <= TARGET_RATIO, format_table(summary)
    assert (tmp_path / "demo" / "comparison.png").is_file()
