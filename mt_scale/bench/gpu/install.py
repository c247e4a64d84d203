"""Wheels on a bare GPU machine with no network: join split wheels, install offline what this Python lacks.

The standard library only (and `packaging` when present): it runs before DALI and webdataset are
installed. The `mt_scale` package itself imports torch and timm (its models register with timm), which
the GPU machines have (docs/performance.md, GPU check)."""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from mt_scale.errors import MtScaleError

# What the kit imports beyond the standard library: import name -> the distribution to bring as a wheel.
REQUIRED_MODULES = {
    "torch": "torch", "timm": "timm", "accelerate": "accelerate", "numpy": "numpy",
    "cv2": "opencv-python-headless", "PIL": "pillow", "yaml": "pyyaml", "tqdm": "tqdm",
    "safetensors": "safetensors", "sklearn": "scikit-learn",
    "matplotlib": "matplotlib", "tensorboard": "tensorboard", "webdataset": "webdataset",
    "nvidia.dali": "nvidia-dali-cuda130 (CUDA 13 torch) or nvidia-dali-cuda120 (CUDA 12 torch)",
}  # fmt: skip

_PART = re.compile(r"^(?P<wheel>.+\.whl)\.part-[A-Za-z0-9]+$")


def _dist_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _wheel_dist(wheel: Path) -> tuple[str, str]:
    """(normalised distribution name, version) from a wheel file name."""
    parts = wheel.name[: -len(".whl")].split("-")
    if len(parts) < 5:
        raise MtScaleError(
            f"{wheel}: not a wheel file name (name-version-python-abi-platform.whl); remove it"
        )
    return _dist_name(parts[0]), parts[1]


def _wheel_problem(path: Path, sha256_file: Path) -> str | None:
    if sha256_file.is_file():
        expected = sha256_file.read_text().split()[0].lower()
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 24), b""):
                digest.update(chunk)
        if digest.hexdigest() != expected:
            return f"do not match {sha256_file.name} (a part is missing, extra or damaged)"
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError) as exc:
        return f"do not make a valid wheel ({exc}: a part is missing or damaged)"
    return f"make a wheel whose member {bad} is damaged" if bad else None


def join_wheel_parts(folder: Path) -> list[Path]:
    """Join every `<wheel>.part-*` group under `folder` (`split -b 55m`) into `<wheel>` beside its parts,
    in suffix order; returns the wheels made.

    A wheel that is already there and valid is kept. The joined file must be a valid zip (every
    member's CRC checked) and match `<wheel>.sha256` when that file is present.
    """
    groups: dict[Path, list[Path]] = {}
    for path in sorted(folder.rglob("*.whl.part-*")):
        match = _PART.match(path.name)
        if match and path.is_file():
            groups.setdefault(path.parent / match["wheel"], []).append(path)
    made = []
    for wheel, parts in sorted(groups.items()):
        checksum = wheel.with_name(f"{wheel.name}.sha256")
        if wheel.is_file() and _wheel_problem(wheel, checksum) is None:
            continue
        temp = wheel.with_name(f".{wheel.name}.partial")
        with open(temp, "wb") as out:
            for part in parts:  # split's suffixes (aa, ab, ... or 00, 01, ...) sort in order
                with open(part, "rb") as source:
                    shutil.copyfileobj(source, out, 1 << 24)
        problem = _wheel_problem(temp, checksum)
        if problem:
            temp.unlink()
            raise MtScaleError(
                f"{wheel.parent}: the {len(parts)} parts of {wheel.name} {problem}; bring all its parts "
                "again (docs/performance.md, GPU check)"
            )
        os.replace(temp, wheel)
        made.append(wheel)
    return made


def _installed(dist: str, target: Path | None) -> str | None:
    paths = [str(target)] if target is not None else None
    for found in metadata.distributions(**({"path": paths} if paths else {})):
        if _dist_name(found.metadata["Name"] or "") == dist:
            return found.version
    if target is not None:
        return _installed(dist, None)
    return None


def _requirements(wheel: Path) -> list[str]:
    """The distributions `wheel` requires here (extras and other platforms' markers left out)."""
    try:
        from packaging.requirements import Requirement
    except ImportError:
        return []
    with zipfile.ZipFile(wheel) as archive:
        name = next((n for n in archive.namelist() if n.endswith(".dist-info/METADATA")), None)
        text = archive.read(name).decode("utf-8", "replace") if name else ""
    needed = []
    for line in text.splitlines():
        if line.startswith("Requires-Dist:"):
            requirement = Requirement(line.split(":", 1)[1].strip())
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                needed.append(_dist_name(requirement.name))
    return needed


def prepare_wheels(
    folder: Path, *, target: Path | None = None, dry_run: bool = False, log: Callable[[str], None] = print
) -> dict[str, list[str]]:
    """Join split wheels anywhere under `folder`, then pip-install (offline, --no-deps) every wheel under
    it whose distribution is not installed yet.

    `target`: install there (pip --target) instead of this environment; `dry_run`: pip --dry-run.
    Returns {"joined", "installed", "present", "unmet"}; "unmet" names requirements of the installed
    wheels that are neither installed nor among the wheels (bring those too).
    """
    summary: dict[str, list[str]] = {"joined": [], "installed": [], "present": [], "unmet": []}
    if not folder.is_dir():
        log(f"mt-bench gpu: no wheel folder {folder}: nothing to install")
        return summary
    summary["joined"] = [p.name for p in join_wheel_parts(folder)]
    wheels: dict[str, Path] = {}
    for wheel in sorted(folder.rglob("*.whl")):
        dist, _ = _wheel_dist(wheel)
        if dist in wheels:
            raise MtScaleError(
                f"{folder}: two wheels of {dist} ({wheels[dist].name}, {wheel.name}); keep one"
            )
        wheels[dist] = wheel
    missing = {dist: wheel for dist, wheel in wheels.items() if _installed(dist, target) is None}
    summary["present"] = sorted(set(wheels) - set(missing))
    if missing:
        command = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-index",
            "--no-deps",
            "--no-compile",
            "--no-cache-dir",
            "--disable-pip-version-check",
            "-q",
            "--find-links",
            str(folder),
        ]
        command += ["--target", str(target)] if target is not None else []
        command += ["--dry-run"] if dry_run else []
        done = subprocess.run([*command, *map(str, missing.values())], capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no message"])[-1]
            raise MtScaleError(
                f"{folder}: pip could not install {', '.join(sorted(missing))} offline: {last}"
            )
        summary["installed"] = sorted(missing)
    for dist, wheel in sorted(missing.items()):
        for needed in _requirements(wheel):
            if needed not in wheels and _installed(needed, target) is None:
                summary["unmet"].append(f"{dist} needs {needed}")
    log(
        f"mt-bench gpu: wheels in {folder}: joined {summary['joined'] or 'none'}, installed "
        f"{summary['installed'] or 'none'}, already present {summary['present'] or 'none'}"
    )
    for line in summary["unmet"]:
        log(f"mt-bench gpu: WARNING: {line}, which is neither installed nor in {folder}: bring its wheel")
    if target is not None and not dry_run and str(target) not in sys.path:
        sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    return summary


def missing_modules() -> list[str]:
    """What the kit imports that this Python lacks, as 'module (wheel to bring)'."""
    absent = []
    for module, dist in REQUIRED_MODULES.items():
        try:
            importlib.import_module(module)
        except ImportError:
            absent.append(f"{module} ({dist})")
    return absent
