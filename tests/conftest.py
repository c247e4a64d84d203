"""Shared session fixtures: small shard sets every package's tests read (built once per session)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from shard_tools.pack import default_workers, pack
from shard_tools.samples import write_photo_tree


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, each worker's torch (and every process it starts) gets its share of the
    cores: two workers of two OpenMP threads each on two cores spin against each other and run the
    training tests several times slower than one thread each.

    `--dist loadgroup` needs a pytest below 9.2 (the test extra's pin): from 9.2 on pytest-xdist's
    grouping does not take, silently, and every worker would build every session run."""
    version = tuple(int(part) for part in pytest.__version__.split(".")[:2] if part.isdigit())
    if config.getoption("dist", None) == "loadgroup" and version >= (9, 2):
        raise pytest.UsageError(f"pytest {pytest.__version__} breaks pytest-xdist's --dist loadgroup: "
                                "install the test extra's pytest (make setup)")
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not workers:
        return
    threads = max(1, default_workers() // int(workers))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scikit-learn digits, 5 labels per class, seed 0, 256 images per shard (several shards per split)."""
    out = tmp_path_factory.mktemp("digits") / "shards"
    pack("digits", out, labels_per_class=5, seed=0, shard_size=256, workers=1, progress=False)
    return out


@pytest.fixture(scope="session")
def photo_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 training and 16 val JPEGs of 320x240, 4 classes, as train/<class>/*.JPEG and val/<class>/*.JPEG."""
    root = tmp_path_factory.mktemp("photos") / "tree"
    return write_photo_tree(root, count=64, num_classes=4, size=(320, 240), seed=0, with_val=True, val_count=16)


@pytest.fixture(scope="session")
def photo_shards(photo_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The photo tree packed with a quarter of each class labeled and 16 images per shard."""
    out = tmp_path_factory.mktemp("photo_shards") / "shards"
    pack(photo_tree, out, label_fraction=0.25, seed=0, shard_size=16, workers=1, progress=False)
    return out


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Torch on one thread meanwhile: a float reduction split over another thread count rounds
    differently, and 50 steps at the digits' learning rate magnify that past any tolerance."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass(frozen=True)
class ReferenceRun:
    """A finished digits run and the settings that made it; `config` builds another run with them."""

    result: Any  # mt_scale.train.TrainResult
    overrides: tuple[str, ...]

    @property
    def run_dir(self) -> Path:
        return self.result.run_dir

    def config(self, shards: str | Path, out: Path, *extra: str):
        from mt_scale.config import load_config

        return load_config("digits-demo", overrides=[f"run.shards={shards}", f"run.output_dir={out}",
                                                     *self.overrides, *extra])


# 2 epochs of 25 steps, every step logged, evaluated and checkpointed after each epoch (the last
# checkpoint kept), in-process loading: a run with data.workers=1 draws the very same batches.
REFERENCE_OVERRIDES = ("data.workers=0", "run.epochs=2", "optim.lr_rampdown_epochs=2", "run.eval_every_epochs=1",
                       "run.checkpoint_every_epochs=1", "run.keep_checkpoints=1", "run.log_every_steps=1")


@pytest.fixture(scope="session")
def reference_run(digits_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> ReferenceRun:
    """One finished digits run (on one torch thread) that every test only reads: its artefacts, and the
    uninterrupted run each exact-resume check (stopped, SIGTERM, from object storage) compares with.
    Compare under `one_torch_thread()`."""
    from mt_scale.train import train

    reference = ReferenceRun(None, REFERENCE_OVERRIDES)
    cfg = reference.config(digits_shards, tmp_path_factory.mktemp("reference") / "run")
    with one_torch_thread():
        return ReferenceRun(train(cfg, progress=False), REFERENCE_OVERRIDES)


@pytest.fixture(scope="session")
def torch_thread() -> Any:
    """`with torch_thread():` torch on one thread, as the reference run was trained."""
    return one_torch_thread


# Object storage: a real S3 server (moto, in a subprocess) and its fixtures, from
# tests/s3_server.py, loaded by path so it works whatever sys.path the run has.
def _load_s3_server_fixtures():
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("mt_scale_test_s3_server", Path(__file__).with_name("s3_server.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


_s3_server_module = _load_s3_server_fixtures()
s3_server, s3_env, start_s3_server, pushed_digits = (
    _s3_server_module.s3_server, _s3_server_module.s3_env, _s3_server_module.start_s3_server,
    _s3_server_module.pushed_digits,
)
