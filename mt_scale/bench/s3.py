"""mt-bench pipeline --source s3: loader img/s from a local S3 server vs from local disk, same set, same run.

The S3 server is moto's (`pip install 'moto[server]'`, the test extra) in a subprocess on a free
127.0.0.1 port: it measures what our S3 path costs (boto3, one ranged GET per shard span, HTTP)
without a network in the way; a real store adds its latency and bandwidth on top. Self-contained:
`mt-bench pipeline --source s3` calls `bench_s3_source` and nothing else here.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

_BUCKET = "mt-bench"
_GET_LINE = re.compile(r'"GET /[^ ]+\.tar HTTP/')
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _figure(name: str, unit: str, values: list[float], **detail: object) -> dict:
    """One figure in mt-bench's result format (median, min, max over repeats, raw values, detail)."""
    return {"name": name, "unit": unit, "median": float(statistics.median(values)), "min": float(min(values)),
            "max": float(max(values)), "repeats": len(values), "values": [float(v) for v in values], "detail": detail}


@contextlib.contextmanager
def _moto_server(log_path: Path) -> Iterator[str]:
    """moto's S3 server in a subprocess; yields its endpoint URL and stops it after."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    environment = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    environment.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")  # its request log is read while it runs
    with open(log_path, "ab") as log:
        process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                   stdout=log, stderr=subprocess.STDOUT, env=environment)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"{endpoint}/moto-api/data.json", timeout=2).read()
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the moto S3 server did not start; see {log_path}")
            time.sleep(0.1)
        yield endpoint
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def _aws_environment(endpoint: str) -> Iterator[None]:
    """This process's AWS settings pointed at `endpoint` with dummy credentials; restored after."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    for name in saved:
        del os.environ[name]
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true",
                      AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)
    try:
        yield
    finally:
        for name in [k for k in os.environ if k.startswith("AWS_")]:
            del os.environ[name]
        os.environ.update(saved)


def _dali_device() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (DALI CPU operators)"


def bench_s3_source(tree: Path, work_dir: Path, repeats: int, batch_size: int = 64, labeled_per_batch: int = 16,
                    workers: int | None = None, backends: tuple[str, ...] = ("torch",)) -> list[dict]:
    """Training img/s of each backend reading the packed `tree` from local disk and from a local S3 server.

    Per backend: `pipeline/<backend>_local`, `pipeline/<backend>_s3` (one untimed warm-up epoch each,
    then `repeats` epochs interleaved, so machine load hits both alike) and `pipeline/<backend>_s3_vs_local`,
    the ratio per repeat (aim: at least 0.8; for DALI also `loader/dali_s3_vs_local`). The S3 figure
    records the shard GETs of one epoch.
    """
    if importlib.util.find_spec("moto") is None:
        from mt_scale.errors import MtScaleError

        raise MtScaleError("mt-bench pipeline --source s3 needs moto's S3 server: pip install 'moto[server]'")
    from pipelines import build_loaders, resolve_backend
    from pipelines.config import DataConfig
    from shard_tools import s3
    from shard_tools.pack import default_workers, pack
    from shard_tools.push import push

    workers = workers or default_workers()
    shard_dir = work_dir / "s3-bench-shards"
    shutil.rmtree(shard_dir, ignore_errors=True)
    has_val = (tree / "train").is_dir() and (tree / "val").is_dir()
    pack(tree, shard_dir, label_fraction=0.25, seed=0, val_fraction=None if has_val else 0.0, workers=workers,
         progress=False)
    cfg = DataConfig(batch_size=batch_size, labeled_per_batch=labeled_per_batch, student_aug="imagenet-train",
                     teacher_aug="imagenet-train", eval_aug="imagenet-eval", workers=workers, seed=0)

    def shard_gets() -> int:
        return len(_GET_LINE.findall(_ANSI.sub("", log_path.read_text(errors="replace"))))

    def epoch(loaders) -> int:
        return sum(int(batch["student"].shape[0]) for batch in loaders.train)

    log_path = Path(tempfile.mkdtemp(prefix="mt-bench-moto-")) / "server.log"
    results: list[dict] = []
    try:
        with _moto_server(log_path) as endpoint, _aws_environment(endpoint):
            s3.reset_client()
            s3.client().create_bucket(Bucket=_BUCKET)  # type: ignore[attr-defined]
            url = f"s3://{_BUCKET}/set"
            push(shard_dir, url, progress=False)
            for backend in backends:
                chosen = resolve_backend(backend)
                sources = {"local": build_loaders(shard_dir, cfg, backend=chosen),
                           "s3": build_loaders(url, cfg, backend=chosen)}
                rates: dict[str, list[float]] = {name: [] for name in sources}
                images = {name: epoch(loaders) for name, loaders in sources.items()}  # warm-up
                logged = shard_gets()
                for _ in range(repeats):
                    for name, loaders in sources.items():
                        started = time.perf_counter()
                        images[name] = epoch(loaders)
                        rates[name].append(images[name] / (time.perf_counter() - started))
                time.sleep(0.2)  # the server logs a request just after answering it
                gets = (shard_gets() - logged) / repeats
                detail = {"backend": chosen, "workers": workers, "batch_size": batch_size,
                          "images_per_epoch": images["local"], "server": "moto (local, 127.0.0.1)"}
                results.append(_figure(f"pipeline/{backend}_local", "img/s", rates["local"], **detail))
                results.append(_figure(f"pipeline/{backend}_s3", "img/s", rates["s3"], **detail,
                                       shard_gets_per_epoch=gets))
                ratios = [r / b for r, b in zip(rates["s3"], rates["local"], strict=True)]
                results.append(_figure(f"pipeline/{backend}_s3_vs_local", "ratio", ratios, aim=">= 0.8"))
                if chosen == "dali":  # the loader's own figure: DALI fed by our readers from s3:// vs disk
                    results.append(_figure("loader/dali_s3_vs_local", "ratio", ratios, aim=">= 0.8",
                                           shard_gets_per_epoch=gets, device=_dali_device()))
    finally:
        s3.reset_client()
        shutil.rmtree(log_path.parent, ignore_errors=True)
    return results
