"""`mt-shard info` and `mt-shard verify` start light: no torch, webdataset or OpenCV (checked with -X importtime)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "webdataset", "cv2", "timm", "accelerate", "nvidia.dali")


def imported_by(argv: list[str]) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run `python -X importtime -m shard_tools.cli ARGV`; the process and every module it imported."""
    environment = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "shard_tools.cli", *argv], cwd=REPO,
                            env=environment, capture_output=True, text=True, timeout=120)
    modules = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    return result, modules


@pytest.mark.parametrize("command", [["info"], ["verify"]])
def test_info_and_verify_do_not_import_torch(digits_shards: Path, command: list[str]):
    result, modules = imported_by([*command, str(digits_shards)])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "json" in modules or "tarfile" in modules  # the importtime report was read
    assert not [name for name in HEAVY if name in modules], sorted(name for name in HEAVY if name in modules)
    assert "boto3" not in modules  # a local set needs no S3 client


def test_verify_decode_loads_the_decoder_but_not_torch(digits_shards: Path):
    result, modules = imported_by(["verify", "--decode", str(digits_shards)])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "PIL.Image" in modules and "torch" not in modules and "webdataset" not in modules


def test_info_on_s3_imports_boto3_but_not_torch(s3_env: str, digits_shards: Path):
    from shard_tools.push import push

    url = f"{s3_env}/light"
    push(digits_shards, url, workers=4, progress=False)
    result, modules = imported_by(["info", url])
    assert result.returncode == 0 and result.stdout.startswith(f"shard set {url} "), result.stderr[-2000:]
    assert "boto3" in modules and "torch" not in modules and "cv2" not in modules
