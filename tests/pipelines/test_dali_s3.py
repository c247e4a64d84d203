"""The DALI backend reading a shard set from s3:// (moto's server over HTTP) through the project's readers.

The same batches as from the local copy, an exact resume, one ranged GET per shard span (counted on
the server), any endpoint boto3 finds, and a store gone mid-epoch as one line with no worker left.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import pytest
import torch

from pipelines import build_loaders
from pipelines.errors import PipelineError
from shard_tools.push import push

pytest.importorskip("nvidia.dali")


def _pushed(shards: Path, url: str) -> str:
    push(shards, url, workers=4, progress=False)
    return url


def take(loader, count=None) -> list[dict]:
    batches = []
    for batch in loader:
        batches.append({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()})
        if len(batches) == count:
            break
    return batches


def assert_same_batches(first: list[dict], second: list[dict], names: tuple[str, ...]) -> None:
    assert len(first) == len(second) > 0
    for a, b in zip(first, second, strict=True):
        assert a["key"] == b["key"] and torch.equal(a["label"], b["label"])
        assert all(torch.equal(a[name], b[name]) for name in names)


def _tar_gets(s3_server, bucket_prefix: str, since: int) -> list[str]:
    return [path for method, path in s3_server.requests()[since:]
            if method == "GET" and path.startswith(bucket_prefix) and path.split("?")[0].endswith(".tar")]


@pytest.mark.timeout(300)
def test_dali_reads_the_s3_set_like_the_local_copy_and_resumes(s3_env: str, digits_shards: Path, digits_config):
    url = _pushed(digits_shards, f"{s3_env}/dali")
    local = build_loaders(digits_shards, digits_config(), backend="dali", with_keys=True)
    full, full_val = take(local.train), take(local.val)
    remote = build_loaders(url, digits_config(), backend="dali", with_keys=True)
    del local
    head = take(remote.train, 6)
    state = remote.state_dict()
    del remote  # stopped, as a pre-empted run is
    resumed = build_loaders(url, digits_config(), backend="dali", with_keys=True)
    resumed.load_state_dict(state)
    tail = take(resumed.train)
    assert_same_batches(head + tail, full, ("student", "teacher"))  # keys, labels and views, in order
    assert_same_batches(take(resumed.val), full_val, ("image", "valid"))
    assert sum(len(batch["key"]) for batch in full_val) == 539  # every val sample once


@pytest.mark.timeout(300)
def test_one_dali_epoch_of_the_digits_preset_reads_spans_not_members(s3_server, s3_env: str, digits_shards: Path):
    from mt_scale.config import load_config

    url = _pushed(digits_shards, f"{s3_env}/gets")
    cfg = load_config(preset="digits-demo").data
    since = len(s3_server.requests())
    loaders = build_loaders(url, cfg, backend="dali")
    rows = sum(len(batch["label"]) for batch in loaders.train)  # one epoch
    scored = sum(int(batch["valid"].sum()) for batch in loaders.val)  # the final val pass
    gets = _tar_gets(s3_server, "/" + url[len("s3://"):] + "/", since)
    assert rows == len(loaders.train) * cfg.batch_size == 25 * 64 and scored == 539
    # one GET per shard span a reader reads (plus the readers' prefetch into the next epoch and pass),
    # where DALI's own webdataset reader made one per member (8,642)
    assert 9 <= len(gets) <= 60, gets
    assert max(gets.count(path) for path in gets) <= 3


@pytest.mark.timeout(120)
def test_dali_finds_the_store_as_boto3_does(s3_server, s3_env: str, digits_shards: Path, digits_config,
                                            monkeypatch):
    url = _pushed(digits_shards, f"{s3_env}/endpoint")
    local = take(build_loaders(digits_shards, digits_config(), backend="dali", with_keys=True).train, 2)
    # the endpoint only in AWS_ENDPOINT_URL_S3 (DALI's own S3 client would not find it)
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint)
    remote = take(build_loaders(url, digits_config(), backend="dali", with_keys=True).train, 2)
    assert_same_batches(remote, local, ("student", "teacher"))


@pytest.mark.timeout(300)
def test_store_gone_mid_epoch_is_one_line_and_ends_the_readers(start_s3_server, digits_shards: Path, digits_config,
                                                               monkeypatch):
    server = start_s3_server()
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    from shard_tools import s3

    s3.client().create_bucket(Bucket="gone-dali")
    url = _pushed(digits_shards, "s3://gone-dali/digits")
    before = set(multiprocessing.active_children())
    loaders = build_loaders(url, digits_config(workers=2), backend="dali")
    batches = iter(loaders.train)
    next(batches)  # the readers have read their first spans
    readers = [p for p in multiprocessing.active_children() if p not in before]
    assert len(readers) == 2 and all(p.is_alive() for p in readers)  # one Python worker per reader
    server.stop()
    started = time.monotonic()
    with pytest.raises(PipelineError) as error:
        for _ in batches:
            pass
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message, message
    assert message.startswith("s3://gone-dali/digits/train-") and ".tar" in message.split(":")[1], message
    assert "cannot reach the object store" in message and "after 2 attempts" in message
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in message
    assert time.monotonic() - started < 60
    assert not [p for p in readers if p.is_alive()]  # no worker left behind
