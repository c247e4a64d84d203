"""Helpers for the shard_tools tests: the one-line CLI error, copies of a packed set, small mounts."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from shard_tools.cli import main


@pytest.fixture
def cli_error(capsys) -> Callable[[list[str]], str]:
    """Run mt-shard; assert exit status 2, exactly one error line on stderr and no traceback; return it."""

    def run(argv: list[str]) -> str:
        assert main(argv) == 2
        captured = capsys.readouterr()
        # A progress bar may have been drawn before the error: drop its frames, keep the error lines.
        frames = [part.strip() for line in captured.err.splitlines() for part in line.split("\r")]
        lines = [frame for frame in frames if frame and not re.match(r"^\w+:\s+\d+%\|", frame)]
        assert len(lines) == 1 and lines[0].startswith(f"mt-shard {argv[0]}: error: "), captured.err
        assert "Traceback" not in captured.err + captured.out
        return lines[0]

    return run


@pytest.fixture
def set_copy(digits_shards: Path, tmp_path: Path) -> Path:
    """A private copy of the session's digits set (5 labels per class, 256 images per shard)."""
    copy = tmp_path / "set"
    shutil.copytree(digits_shards, copy)
    return copy


@pytest.fixture
def mount_tmpfs() -> Callable[[Path, str], bool]:
    """mount(folder, options) -> True when a tmpfs with those options is mounted there (root only);
    every mount is undone after the test."""
    mounted: list[Path] = []

    def mount(folder: Path, options: str) -> bool:
        folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0 or not shutil.which("mount"):
            return False
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                              capture_output=True, check=False)
        if done.returncode == 0:
            mounted.append(folder)
        return done.returncode == 0

    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], capture_output=True, check=False)


@pytest.fixture
def read_only_dir(tmp_path: Path, mount_tmpfs) -> Path:
    """An existing folder nothing can be written into: a read-only tmpfs for root (root ignores
    permission bits), mode 0555 for anyone else."""
    folder = tmp_path / "read-only"
    if os.geteuid() == 0:
        if not mount_tmpfs(folder, "ro,size=64k"):
            pytest.skip("running as root and cannot mount a read-only tmpfs")
        yield folder
        return
    folder.mkdir()
    folder.chmod(0o555)
    yield folder
    folder.chmod(0o755)


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.fixture
def snapshot() -> Callable[[Path], dict[str, tuple[int, int]]]:
    """snapshot(root): every file and folder under root with its size and mtime, to compare after a refusal."""
    return _snapshot
