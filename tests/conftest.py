"""Shared session fixtures: small shard sets every package's tests read (built once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shard_tools.pack import pack
from shard_tools.samples import write_photo_tree


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
s3_server, s3_env, start_s3_server = (
    _s3_server_module.s3_server, _s3_server_module.s3_env, _s3_server_module.start_s3_server
)
