"""Loading a shard set straight from s3:// (a real moto server in a subprocess, over HTTP).

The torch backend gives the same batches from the pushed set as from the local copy and reads one
ranged GET per shard span a worker owns; every failure (missing bucket or prefix, server gone
mid-epoch) is one line. The DALI backend's s3:// tests are in test_dali_s3.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipelines import build_loaders
from pipelines.errors import PipelineError
from pipelines.mixing import reader_range, reads_whole_split
from pipelines.reading import open_set
from shard_tools.format import SPLITS, TRAIN_LABELED, TRAIN_UNLABELED
from shard_tools.push import push

REPO = Path(__file__).resolve().parents[2]


def _pushed(shards: Path, url: str) -> str:
    push(shards, url, workers=4, progress=False)
    return url


def _epochs(loaders, epochs: int = 2) -> list[dict]:
    """Every training batch of `epochs` epochs: keys, labels and both views."""
    return [{"key": list(batch["key"]), "label": batch["label"].clone(), "student": batch["student"].clone(),
             "teacher": batch["teacher"].clone()} for _ in range(epochs) for batch in loaders.train]


def _same_batches(first: list[dict], second: list[dict]) -> None:
    assert len(first) == len(second) > 0
    for a, b in zip(first, second, strict=True):
        assert a["key"] == b["key"]
        assert torch.equal(a["label"], b["label"])
        assert torch.equal(a["student"], b["student"]) and torch.equal(a["teacher"], b["teacher"])


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message, message
    return message


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.timeout(300)
def test_torch_backend_gives_the_local_batches(s3_env: str, pushed_digits: str, digits_shards: Path, digits_config, workers: int):
    url = pushed_digits
    cfg = digits_config(workers=workers)
    local = build_loaders(digits_shards, cfg, backend="torch", with_keys=True)
    remote = build_loaders(url, cfg, backend="torch", with_keys=True)
    assert len(remote.train) == len(local.train) and remote.class_names == local.class_names
    _same_batches(_epochs(remote), _epochs(local))  # 2 epochs: keys, labels, student and teacher views
    val_local, val_remote = list(local.val), list(remote.val)
    assert [b["key"] for b in val_remote] == [b["key"] for b in val_local]
    assert all(torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
               for a, b in zip(val_remote, val_local, strict=True))


def _tar_gets(s3_server, bucket_prefix: str, since: int) -> list[str]:
    return [path for method, path in s3_server.requests()[since:]
            if method == "GET" and path.startswith(bucket_prefix) and path.split("?")[0].endswith(".tar")]


@pytest.mark.timeout(300)
def test_torch_backend_reads_one_ranged_get_per_shard_span(s3_server, s3_env: str, pushed_digits: str,
                                                           digits_config):
    url = pushed_digits
    cfg = digits_config(workers=2)
    loaders = build_loaders(url, cfg, backend="torch")
    _, splits = open_set(url)
    since = len(s3_server.requests())
    rows = drawn = 0
    for batch in loaders.train:  # one epoch
        rows += len(batch["label"])
    drawn = rows
    gets = _tar_gets(s3_server, "/" + url[len("s3://"):] + "/", since)

    # What each of the 2 workers owns this epoch: its range of the unlabeled split (read through, its
    # quota plus the shuffle buffer exceed it) and its range of the labeled split (held in memory).
    labeled, unlabeled = splits[TRAIN_LABELED], splits[TRAIN_UNLABELED]
    assert not reads_whole_split(labeled.total, 2, cfg.labeled_per_batch)
    spans = [(split.name, number) for split in (labeled, unlabeled) for worker in range(2)
             for number, _, _ in split.pieces(reader_range(split.total, 0, 1, worker, 2))]
    assert len(gets) == len(spans) == 8, gets  # one GET per span: 2 labeled + 6 unlabeled
    assert sorted(path.rsplit("/", 1)[-1] for path in gets) == sorted(
        Path(unlabeled.shards[n] if name == TRAIN_UNLABELED else labeled.shards[n]).name for name, n in spans)
    assert drawn == len(loaders.train) * cfg.batch_size and drawn > 100 * len(gets)  # never one per sample


def test_missing_bucket_or_prefix_is_one_line(s3_env: str, digits_config):
    with pytest.raises(PipelineError) as error:
        build_loaders("s3://no-such-bucket-mt/set", digits_config(), backend="torch")
    line = _one_line(error)
    assert line.startswith("s3://no-such-bucket-mt/set/manifest.json") and "no bucket 'no-such-bucket-mt'" in line
    with pytest.raises(PipelineError) as error:
        build_loaders(f"{s3_env}/nothing-here", digits_config(), backend="torch")
    line = _one_line(error)
    assert f"{s3_env}/nothing-here/manifest.json: no such object" in line and "mt-shard push" in line


@pytest.mark.timeout(300)
def test_server_gone_mid_epoch_is_one_line_in_bounded_time(start_s3_server, digits_shards: Path, digits_config,
                                                          monkeypatch):
    server = start_s3_server()
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    from shard_tools import s3

    s3.client().create_bucket(Bucket="gone")
    url = _pushed(digits_shards, "s3://gone/digits")
    loaders = build_loaders(url, digits_config(workers=2), backend="torch")
    batches = iter(loaders.train)
    # Batch k comes from worker k % 2 (the DataLoader takes its workers in turn), so after two batches
    # both workers have made a batch: each has read every index of its range and its first spans, and
    # what is left of the epoch is shard spans only.
    assert len(loaders.train) > 4
    next(batches), next(batches)
    server.stop()
    started = time.monotonic()
    with pytest.raises(PipelineError) as error:
        for _ in batches:
            pass
    line = _one_line(error)
    assert line.startswith("s3://gone/digits/train-") and ".tar" in line.split(":")[1], line
    assert "cannot reach the object store" in line and "after 2 attempts" in line and "AWS_ENDPOINT_URL" in line
    assert time.monotonic() - started < 60


WORKERS_AFTER_FORKSERVER = """
import os, sys
from pipelines import DataConfig, build_loaders
from pipelines.torch_loader import worker_context
import multiprocessing.forkserver

if __name__ == "__main__":
    settings = {name: os.environ.pop(name) for name in list(os.environ) if name.startswith("AWS_")}
    os.environ["AWS_ENDPOINT_URL"] = "http://127.0.0.1:9"  # stale: nothing listens there
    worker_context()
    multiprocessing.forkserver.ensure_running()  # started with the stale settings
    os.environ.update(settings)  # then set (a notebook cell, a launcher)
    cfg = DataConfig(batch_size=64, labeled_per_batch=16, student_aug="digits-train", teacher_aug="digits-train",
                     eval_aug="digits-eval", workers=2, shuffle_buffer=64, eval_batch_size=128)
    loaders = build_loaders(sys.argv[1], cfg, backend="torch")
    batch = next(iter(loaders.train))
    print("rows", len(batch["label"]), flush=True)
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_workers_use_the_aws_settings_of_the_loader_not_the_forkserver(s3_env: str, pushed_digits: str):
    url = pushed_digits
    environment = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", AWS_MAX_ATTEMPTS="1")
    result = subprocess.run([sys.executable, "-c", WORKERS_AFTER_FORKSERVER, url], capture_output=True, text=True,
                            timeout=280, env=environment, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["rows", "64"]


def test_open_set_lists_s3_urls(s3_env: str, pushed_digits: str):
    url = pushed_digits
    manifest, splits = open_set(url)
    assert set(splits) == set(SPLITS) and manifest.num_classes == 10
    assert all(shard.startswith(f"{url}/") and shard.endswith(".tar") for split in splits.values()
               for shard in split.shards)


# Training end to end (mt_scale on top of these loaders): the session's reference run, from the store.
@pytest.mark.slow
@pytest.mark.xdist_group("reference_runs")  # in the pytest-xdist worker that holds the reference run
@pytest.mark.timeout(600)
def test_training_from_s3_gives_the_local_teacher_and_keeps_secrets_out(s3_env: str, pushed_digits: str,
                                                                        reference_run, torch_thread, tmp_path: Path):
    from mt_scale.train import train

    url = pushed_digits
    with torch_thread():
        remote = train(reference_run.config(url, tmp_path / "s3"), progress=False)
    local, remote_state = reference_run.result.teacher.state_dict(), remote.teacher.state_dict()
    assert local.keys() == remote_state.keys()
    for key in local:
        assert torch.equal(local[key], remote_state[key]), key
    report = remote.report
    assert report["steps"] == reference_run.result.report["steps"] > 0 and report["config"]["run"]["shards"] == url
    secrets = (os.environ["AWS_SECRET_ACCESS_KEY"], os.environ["AWS_ACCESS_KEY_ID"])
    for path in (tmp_path / "s3").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not any(secret.encode() in data for secret in secrets), path
