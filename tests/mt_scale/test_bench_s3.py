"""mt-bench pipeline --source s3: the same set from a local moto S3 server and from local disk, one run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mt_scale.cli import bench_main


@pytest.mark.timeout(300)
def test_pipeline_from_s3_beside_local_disk(photo_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "bench.json"
    aws_before = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    argv = ["pipeline", "--source", "s3", "--images", str(photo_tree), "--batch-size", "8", "--labeled-per-batch",
            "2", "--workers", "1", "--repeats", "1", "--backends", "torch", "--json", str(out), "--work-dir",
            str(tmp_path / "work")]
    assert bench_main(argv) == 0
    printed = capsys.readouterr().out
    results = {r["name"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {"pipeline/torch_local", "pipeline/torch_s3", "pipeline/torch_s3_vs_local"}
    assert all(name in printed for name in results)
    local, remote = results["pipeline/torch_local"], results["pipeline/torch_s3"]
    # the photo tree's 64 training images: 48 unlabeled in batches of 6 (+2 labeled) = 8 batches of 8 rows
    assert local["detail"]["images_per_epoch"] == remote["detail"]["images_per_epoch"] == 64
    assert 0 < remote["detail"]["shard_gets_per_epoch"] <= 8  # spans, never one per image
    ratio = results["pipeline/torch_s3_vs_local"]
    assert ratio["median"] == pytest.approx(remote["values"][0] / local["values"][0]) and ratio["detail"]["aim"] == ">= 0.8"
    assert {k: v for k, v in os.environ.items() if k.startswith("AWS_")} == aws_before  # restored


@pytest.mark.timeout(300)
def test_dali_loader_from_s3_beside_local_disk(photo_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("nvidia.dali")
    out = tmp_path / "bench.json"
    argv = ["pipeline", "--source", "s3", "--images", str(photo_tree), "--batch-size", "8", "--labeled-per-batch",
            "2", "--workers", "1", "--repeats", "1", "--backends", "dali", "--json", str(out), "--work-dir",
            str(tmp_path / "work")]
    assert bench_main(argv) == 0
    report = json.loads(out.read_text())
    results = {r["name"]: r for r in report["results"]}
    assert set(results) == {"pipeline/dali_local", "pipeline/dali_s3", "pipeline/dali_s3_vs_local",
                            "loader/dali_s3_vs_local"}
    figure = results["loader/dali_s3_vs_local"]
    assert figure["values"] == results["pipeline/dali_s3_vs_local"]["values"] and figure["detail"]["aim"] == ">= 0.8"
    # the DALI readers read spans as the torch backend's workers do (plus a prefetch into the next epoch)
    assert 0 < figure["detail"]["shard_gets_per_epoch"] <= 12
    assert [t["figure"] for t in report["targets"]] == ["loader/dali_s3_vs_local"]
