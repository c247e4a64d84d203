"""Shard sets in object storage, against a real S3 server (moto in a subprocess, over HTTP).

push uploads every file with the manifest last and resumes after a kill; reads give the local
bytes; each failure (missing bucket or key, refused or missing credentials, access denied, server
gone before or during a read) is one line naming the URL and the fix, within bounded time.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shard_tools import push as push_module
from shard_tools import s3
from shard_tools.cli import main
from shard_tools.files import sha256_file
from shard_tools.format import MANIFEST_NAME, SPLITS, ShardFormatError, index_name, parse_index
from shard_tools.manifest import read_manifest
from shard_tools.pack import pack
from shard_tools.s3_claim import marker_url

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def digits_set(digits_shards: Path) -> Path:
    """The session's digits set (9 shards): every test here only reads it."""
    return digits_shards


def _set_names(shard_dir: Path) -> set[str]:
    return {path.name for path in shard_dir.iterdir() if not path.name.startswith(".")}


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message, message
    return message


def _cli_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"mt-shard {argv[0]}: error: "), err
    return err


def _fail_uploads_after(uploads: int, monkeypatch) -> object:
    """Make push's uploads fail once `uploads` have gone through; returns the real upload to restore."""
    real_upload = s3.upload_file
    done: list[str] = []

    def upload_then_fail(path, target, **kwargs):
        if len(done) == uploads:
            raise ShardFormatError(f"{target}: injected failure")
        real_upload(path, target, **kwargs)
        done.append(target)

    monkeypatch.setattr(push_module.s3, "upload_file", upload_then_fail)
    return real_upload


def test_parse_url():
    assert s3.parse_url("s3://bucket/prefix/name.tar") == ("bucket", "prefix/name.tar")
    assert s3.parse_url("s3://bucket") == ("bucket", "")
    assert s3.is_s3("s3://b/x") and not s3.is_s3("/data/x") and not s3.is_s3(Path("s3:/b"))
    assert s3.join("s3://b/set/", "manifest.json") == "s3://b/set/manifest.json"
    for bad in ("s3:///key", "s3://bu cket/x", "/local/path"):
        with pytest.raises(ShardFormatError, match="s3://bucket/prefix"):
            s3.parse_url(bad)


def test_push_uploads_every_file_manifest_last(s3_server, s3_env: str, digits_set: Path, capsys):
    url = f"{s3_env}/digits"
    assert main(["push", str(digits_set), url, "--workers", "4", "--quiet"]) == 0
    line = capsys.readouterr().out.strip()
    files = _set_names(digits_set)
    assert f"{len(files)} objects uploaded" in line and "0 already there skipped" in line, line
    assert set(s3.list_names(url)) == files

    # The server's own log: the manifest's PUT comes after every other object's PUT has completed.
    prefix = url[len("s3:/") :] + "/"
    puts = [path[len(prefix) :] for method, path in s3_server.requests() if method == "PUT" and path.startswith(prefix)]
    puts = [name for name in puts if not name.startswith(".")]  # the set's files, not push's writer marker
    assert sorted(puts) == sorted(files) and puts[-1] == MANIFEST_NAME, puts

    manifest = read_manifest(digits_set)
    for split in SPLITS:
        info = manifest.split(split)
        for shard, digest, size in zip(info.shards, info.sha256, info.bytes, strict=True):
            assert s3.object_info(s3.join(url, shard)) == s3.ObjectInfo(size, digest)
    assert s3.read_bytes(s3.join(url, MANIFEST_NAME)) == (digits_set / MANIFEST_NAME).read_bytes()

    # Everything there: a second push uploads nothing.
    summary = push_module.push(digits_set, url, workers=2, progress=False)
    assert (summary.uploaded, summary.skipped) == (0, len(files)) and "nothing uploaded" in summary.line()


def test_reads_give_the_local_bytes(s3_env: str, pushed_digits: str, digits_set: Path):
    url = pushed_digits
    manifest = read_manifest(digits_set)
    shard = manifest.split("val").shards[0]
    local = (digits_set / shard).read_bytes()
    samples = parse_index((digits_set / index_name(shard)).read_text())
    # One member, and a span of several samples, exactly as the index locates them.
    offset, size = samples[3][1]["jpg"]
    assert s3.read_range(s3.join(url, shard), offset, size) == local[offset : offset + size]
    start, end = samples[10][1]["jpg"][0], samples[20][1]["lbl"][0] + samples[20][1]["lbl"][1]
    assert s3.read_range(s3.join(url, shard), start, end - start) == local[start:end]
    assert s3.read_range(s3.join(url, shard), 0, 0) == b""
    assert s3.read_bytes(s3.join(url, index_name(shard))) == (digits_set / index_name(shard)).read_bytes()
    digest = hashlib.sha256()
    chunks = 0
    for block in s3.stream(s3.join(url, shard), chunk=1 << 16):
        digest.update(block)
        chunks += 1
    assert digest.hexdigest() == manifest.split("val").sha256[0] and chunks > 1
    assert s3.exists(s3.join(url, shard)) and not s3.exists(s3.join(url, "val-999999.tar"))
    # through storage (what the loaders call): the same bytes, several nearby ranges cut from one read
    from shard_tools import storage

    ranges = [(samples[i][1]["jpg"][0], 3) for i in range(5)] + [(samples[2][1]["lbl"][0], 4)]
    assert storage.read_ranges(s3.join(url, shard), ranges) == [local[a : a + n] for a, n in ranges]
    assert storage.size(s3.join(url, shard)) == len(local)
    with pytest.raises(FileNotFoundError):
        storage.size(s3.join(url, "val-999999.tar"))
    with pytest.raises(ShardFormatError, match="past the object's end") as error:
        s3.read_range(s3.join(url, shard), len(local) + 10, 5)
    assert shard in _one_line(error)


def test_push_interrupted_by_a_failure_resumes(s3_env: str, digits_set: Path, monkeypatch):
    url = f"{s3_env}/interrupted"
    real_upload = _fail_uploads_after(3, monkeypatch)
    with pytest.raises(ShardFormatError, match="injected failure"):
        push_module.push(digits_set, url, workers=1, progress=False)
    assert len(s3.list_names(url)) == 3 and MANIFEST_NAME not in s3.list_names(url)  # a reader sees no set

    monkeypatch.setattr(push_module.s3, "upload_file", real_upload)
    summary = push_module.push(digits_set, url, workers=2, progress=False)
    files = _set_names(digits_set)
    assert (summary.skipped, summary.uploaded) == (3, len(files) - 3), summary.line()
    assert "3 already there skipped" in summary.line()
    assert set(s3.list_names(url)) == files


# `mt-shard push` that reports each finished upload on the pipe (fd in argv[1]) and holds after the
# third: the test kills it there, with no upload in flight.
PUSH_THEN_HOLD = """
import os, sys, threading
from shard_tools import s3
from shard_tools.cli import main

report = int(sys.argv[1])
real_upload, uploads = s3.upload_file, []

def upload_then_report(path, target, **kwargs):
    real_upload(path, target, **kwargs)
    uploads.append(target)
    os.write(report, target.encode() + b"\\n")
    if len(uploads) == 3:
        threading.Event().wait()

s3.upload_file = upload_then_report
sys.exit(main(sys.argv[2:]))
"""


def test_killed_push_resumes_and_skips_what_was_uploaded(s3_env: str, digits_set: Path, capsys):
    url = f"{s3_env}/killed"
    read_end, write_end = os.pipe()
    command = [sys.executable, "-c", PUSH_THEN_HOLD, str(write_end), "push", str(digits_set), url, "--workers", "1",
               "--quiet"]
    environment = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    process = subprocess.Popen(command, cwd=REPO, env=environment, pass_fds=(write_end,), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reports:
        uploaded = [reports.readline().strip().decode() for _ in range(3)]
        assert all(uploaded), process.communicate()[1]
        process.kill()
        assert reports.read() == b""  # the push is gone
    process.wait()
    present = s3.list_names(url)
    names = [target.rsplit("/", 1)[1] for target in uploaded]
    assert sorted(present) == sorted(names)  # no manifest yet
    bucket, marker = s3.parse_url(marker_url(url))
    s3.client().head_object(Bucket=bucket, Key=marker)  # the killed push's writer marker stays, beside the prefix

    # the killed writer ran on this host and is gone: the rerun takes its marker over and resumes
    summary = push_module.push(digits_set, url, workers=4, progress=False)
    files = _set_names(digits_set)
    assert (summary.skipped, summary.uploaded) == (3, len(files) - 3), summary.line()
    assert set(s3.list_names(url)) == files
    with pytest.raises(s3.client().exceptions.ClientError):
        s3.client().head_object(Bucket=bucket, Key=marker)  # a finished push leaves no marker


def test_push_replaces_a_damaged_object(s3_env: str, digits_set: Path):
    url = f"{s3_env}/damaged"
    push_module.push(digits_set, url, workers=2, progress=False)
    shard = read_manifest(digits_set).split("val").shards[0]
    damaged = bytearray((digits_set / shard).read_bytes())
    damaged[1000] ^= 0xFF  # same size, other bytes, and no sha256 metadata
    s3.client().put_object(Bucket=s3.parse_url(url)[0], Key=f"damaged/{shard}", Body=bytes(damaged))
    summary = push_module.push(digits_set, url, workers=2, progress=False)
    assert summary.uploaded == 1 and s3.object_info(s3.join(url, shard)).sha256 == sha256_file(digits_set / shard)
    assert s3.read_bytes(s3.join(url, shard)) == (digits_set / shard).read_bytes()


def test_push_refuses_what_is_not_a_complete_set(s3_env: str, digits_set: Path, tmp_path: Path, capsys):
    import shutil

    no_manifest = tmp_path / "half"
    shutil.copytree(digits_set, no_manifest)
    (no_manifest / MANIFEST_NAME).unlink()
    line = _cli_error(capsys, ["push", str(no_manifest), f"{s3_env}/x", "--quiet"])
    assert "manifest.json: missing" in line

    no_shard = tmp_path / "no_shard"
    shutil.copytree(digits_set, no_shard)
    shard = read_manifest(no_shard).split("val").shards[0]
    (no_shard / shard).unlink()
    line = _cli_error(capsys, ["push", str(no_shard), f"{s3_env}/x", "--quiet"])
    assert f"{shard}: missing" in line and "not a complete set" in line
    assert s3.list_names(f"{s3_env}/x") == []

    line = _cli_error(capsys, ["push", str(digits_set), "/not/s3", "--quiet"])
    assert "not an s3:// URL" in line


def test_push_refuses_a_prefix_holding_another_set(s3_env: str, pushed_digits: str, photo_shards: Path, capsys):
    url = pushed_digits
    line = _cli_error(capsys, ["push", str(photo_shards), url, "--quiet"])
    assert "already holds another shard set" in line and "new prefix" in line


def test_missing_bucket_and_key_are_one_line(s3_env: str, digits_set: Path, capsys):
    missing_bucket = "s3://no-such-bucket-mt/set"
    for call in (lambda: s3.read_bytes(f"{missing_bucket}/manifest.json"),
                 lambda: s3.exists(f"{missing_bucket}/manifest.json"),
                 lambda: s3.list_names(missing_bucket)):
        with pytest.raises(ShardFormatError) as error:
            call()
        line = _one_line(error)
        assert line.startswith(missing_bucket) and "no bucket 'no-such-bucket-mt'" in line
        assert "check the bucket name" in line
    line = _cli_error(capsys, ["push", str(digits_set), missing_bucket, "--quiet"])
    assert "no bucket 'no-such-bucket-mt'" in line

    with pytest.raises(ShardFormatError) as error:
        s3.read_range(f"{s3_env}/set/val-000000.tar", 0, 10)
    line = _one_line(error)
    assert line.startswith(f"{s3_env}/set/val-000000.tar: no such object") and "mt-shard push" in line


def test_refused_credentials_and_access_denied_are_one_line(s3_server, s3_env: str, monkeypatch):
    import boto3

    url = f"{s3_env}/object.bin"
    s3.client().put_object(Bucket=s3.parse_url(s3_env)[0], Key="object.bin", Body=b"0123456789")
    iam = boto3.client("iam", endpoint_url=s3_server.endpoint)
    iam.create_user(UserName="no-rights")
    key = iam.create_access_key(UserName="no-rights")["AccessKey"]
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    with s3_server.enforce_auth():
        # The fixture's dummy key is unknown to IAM: refused.
        with pytest.raises(ShardFormatError) as error:
            s3.read_range(url, 0, 4)
        line = _one_line(error)
        assert line.startswith(url) and "refused the credentials (InvalidAccessKeyId)" in line
        assert "AWS_ACCESS_KEY_ID" in line and secret not in line
        # A real user with no policy: denied.
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        for call, permission in ((lambda: s3.read_bytes(url), "s3:GetObject"),
                                 (lambda: s3.list_names(s3_env), "s3:ListBucket")):
            with pytest.raises(ShardFormatError) as error:
                call()
            line = _one_line(error)
            assert "access denied" in line and permission in line and "AWS_PROFILE" in line, line
            assert key["SecretAccessKey"] not in line
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
        with pytest.raises(ShardFormatError, match="SignatureDoesNotMatch") as error:
            s3.read_bytes(url)
        assert "wrong-secret" not in _one_line(error)
    # Auth off again: the fixture's credentials read it.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    assert s3.read_range(url, 2, 3) == b"234"


def test_no_credentials_is_one_line(s3_env: str, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    started = time.monotonic()
    with pytest.raises(ShardFormatError) as error:
        s3.read_bytes(f"{s3_env}/manifest.json")
    line = _one_line(error)
    assert "no AWS credentials found" in line and "AWS_PROFILE" in line and time.monotonic() - started < 10


def test_unknown_profile_is_one_line(s3_env: str, monkeypatch):
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    with pytest.raises(ShardFormatError) as error:
        s3.read_bytes(f"{s3_env}/manifest.json")
    assert "'no-such-profile'" in _one_line(error) and "AWS_PROFILE" in _one_line(error)


def test_server_gone_is_one_line_in_bounded_time(start_s3_server, monkeypatch):
    server = start_s3_server()
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    bucket = "gone-bucket"
    s3.client().create_bucket(Bucket=bucket)
    big = os.urandom(24 << 20)  # more than the socket buffers hold: the read is still going when the server dies
    s3.client().put_object(Bucket=bucket, Key="big.bin", Body=big)
    url = f"s3://{bucket}/big.bin"
    assert s3.read_range(url, 5, 5) == big[5:10]

    # Gone mid-read: the stream resumes with ranged GETs, which fail, then one line.
    chunks = s3.stream(url, chunk=1 << 16)
    first = next(chunks)
    assert first == big[: len(first)]
    server.stop()
    started = time.monotonic()
    with pytest.raises(ShardFormatError) as error:
        for _ in chunks:
            pass
    line = _one_line(error)
    assert line.startswith(url) and "cannot reach the object store" in line and "after 2 attempts" in line
    assert "AWS_ENDPOINT_URL" in line and time.monotonic() - started < 30

    # Gone before the read.
    started = time.monotonic()
    with pytest.raises(ShardFormatError) as error:
        s3.read_range(url, 0, 100)
    assert "cannot reach the object store" in _one_line(error) and time.monotonic() - started < 30


def _read_in_child(queue, parent_client, url: str) -> None:
    queue.put((s3.client() is parent_client, s3.read_range(url, 0, 4)))


def test_a_forked_worker_builds_its_own_client(s3_env: str):
    url = f"{s3_env}/fork.bin"
    parent_client = s3.client()
    parent_client.put_object(Bucket=s3.parse_url(s3_env)[0], Key="fork.bin", Body=b"abcdefgh")
    assert s3.client() is parent_client  # cached within a process
    context = multiprocessing.get_context("fork")  # as a DataLoader worker starts on Linux
    queue = context.Queue()
    child = context.Process(target=_read_in_child, args=(queue, parent_client, url))
    child.start()
    reused_parent_client, data = queue.get(timeout=60)
    child.join(timeout=30)
    assert data == b"abcd" and not reused_parent_client


def test_dali_reads_a_pushed_set_through_aws_endpoint_url(s3_env: str, pushed_digits: str, digits_set: Path):
    """DALI 2.4's readers.webdataset takes s3:// shard and index paths and finds the store by AWS_ENDPOINT_URL."""
    from nvidia.dali import fn, pipeline_def, types

    url = pushed_digits
    shard = read_manifest(digits_set).split("val").shards[0]

    def first_batch(base: str) -> list[tuple[bytes, int]]:
        @pipeline_def(batch_size=8, num_threads=1, device_id=None, prefetch_queue_depth=1)
        def reader():
            images, labels = fn.readers.webdataset(
                paths=[f"{base}/{shard}"], index_paths=[f"{base}/{index_name(shard)}"], ext=["jpg", "lbl"],
                dtypes=[types.UINT8, types.INT32], missing_component_behavior="error",
            )
            return images, labels

        pipe = reader()
        pipe.build()
        images, labels = pipe.run()
        return [(images.at(i).tobytes(), int(labels.at(i)[0])) for i in range(8)]

    assert first_batch(url) == first_batch(str(digits_set))


# --- reading a pushed set: info, verify, pack straight to s3:// ---


def test_info_and_verify_read_an_s3_set(s3_server, s3_env: str, pushed_digits: str, digits_set: Path, capsys):
    url = pushed_digits
    assert main(["info", str(digits_set)]) == 0
    local = capsys.readouterr().out.splitlines()
    assert main(["info", url]) == 0
    remote = capsys.readouterr().out.splitlines()
    assert remote[0] == local[0].replace(str(digits_set), url) and remote[1:] == local[1:]

    since = len(s3_server.requests())
    assert main(["verify", url, "--decode"]) == 0
    assert capsys.readouterr().out.strip().splitlines() == [f"{url}: OK"]
    # each shard is streamed once: one GET per shard, whatever its size
    prefix = "/" + url[len("s3://") :] + "/"
    tar_gets = [path[len(prefix) :] for method, path in s3_server.requests()[since:]
                if method == "GET" and path.startswith(prefix) and path.endswith(".tar")]
    manifest = read_manifest(digits_set)
    assert sorted(tar_gets) == sorted(name for split in SPLITS for name in manifest.split(split).shards)


def test_verify_catches_a_flipped_byte_a_missing_shard_and_stray_objects(s3_env: str, digits_set: Path, capsys):
    url = f"{s3_env}/flipped"
    bucket, _ = s3.parse_url(url)
    push_module.push(digits_set, url, workers=4, progress=False)
    manifest = read_manifest(digits_set)
    shard = manifest.split("train-unlabeled").shards[0]
    offset, size = parse_index((digits_set / index_name(shard)).read_text())[7][1]["jpg"]
    damaged = bytearray((digits_set / shard).read_bytes())
    damaged[offset + size // 2] ^= 0x01  # one bit inside an image: the tar and its index stay valid
    s3.client().put_object(Bucket=bucket, Key=f"flipped/{shard}", Body=bytes(damaged))
    assert main(["verify", url]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [f"{shard}: sha256 differs from the manifest (the file changed or is damaged)", f"{url}: 1 problem(s)"]

    missing = manifest.split("val").shards[-1]
    s3.client().delete_object(Bucket=bucket, Key=f"flipped/{missing}")
    s3.client().put_object(Bucket=bucket, Key="flipped/notes.txt", Body=b"x")
    s3.client().put_object(Bucket=bucket, Key="flipped/old/val-000000.tar", Body=b"x")
    assert main(["verify", url]) == 1
    out = capsys.readouterr().out
    assert f"{missing}: missing" in out and "notes.txt: an unexpected object under the prefix" in out
    assert "old/: unexpected objects under the prefix" in out and out.strip().endswith("4 problem(s)"), out


def test_info_and_verify_failures_are_one_line(s3_env: str, capsys):
    for command in ("info", "verify"):
        line = _cli_error(capsys, [command, "s3://no-such-bucket-mt/set"])
        assert "s3://no-such-bucket-mt/set/manifest.json: no bucket 'no-such-bucket-mt'" in line
        line = _cli_error(capsys, [command, f"{s3_env}/nothing"])
        assert f"{s3_env}/nothing/manifest.json: no such object" in line and "mt-shard push" in line


def test_pack_to_s3_stages_locally_then_pushes(s3_env: str, photo_tree: Path, photo_shards: Path, tmp_path: Path,
                                               capsys):
    from shard_tools.pack_s3 import staging_folder

    url = f"{s3_env}/packed"
    argv = ["pack", str(photo_tree), url, "--label-fraction", "0.25", "--shard-size", "16", "--workers", "1",
            "--quiet"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("packed 80 images") and lines[1].startswith("pushed "), lines
    assert lines[1].endswith("staging folder removed") and not staging_folder(url).exists()
    files = _set_names(photo_shards)
    assert set(s3.list_names(url)) == files
    for name in files:  # the bytes of a local pack with the same options
        assert s3.read_bytes(s3.join(url, name)) == (photo_shards / name).read_bytes(), name

    # the prefix now holds a set: refused before packing anything
    line = _cli_error(capsys, argv)
    assert "already holds a complete shard set" in line and "new prefix" in line

    # --staging keeps the local copy; it is refused with a local OUT
    kept = tmp_path / "copy"
    assert main([*argv[:2], f"{s3_env}/kept", *argv[3:], "--staging", str(kept)]) == 0
    assert capsys.readouterr().out.strip().endswith(f"local copy kept in {kept}")
    assert _set_names(kept) == files
    line = _cli_error(capsys, ["pack", "digits", str(tmp_path / "local"), "--staging", str(kept), "--quiet"])
    assert "--staging" in line and "only with an s3:// OUT" in line
    # the Python API never turns a URL into a local folder named "s3:"
    with pytest.raises(ShardFormatError, match="pack writes a local folder"):
        pack("digits", f"{s3_env}/api", labels_per_class=5, workers=1, progress=False)
    assert not Path("s3:").exists()


def test_pack_to_s3_resumes_the_push_without_packing_again(s3_env: str, photo_tree: Path, photo_shards: Path,
                                                            monkeypatch):
    from shard_tools.pack_s3 import pack_to_s3, staging_folder

    url = f"{s3_env}/resumed"
    real_upload = _fail_uploads_after(3, monkeypatch)
    options = dict(label_fraction=0.25, shard_size=16, workers=1, progress=False, push_workers=1)
    with pytest.raises(ShardFormatError, match="injected failure"):
        pack_to_s3(photo_tree, url, **options)
    assert staging_folder(url).is_dir() and MANIFEST_NAME not in s3.list_names(url)

    monkeypatch.setattr(push_module.s3, "upload_file", real_upload)
    packed, pushed, kept = pack_to_s3(photo_tree, url, **options)
    assert packed.already_complete and (pushed.skipped, kept) == (3, None) and not staging_folder(url).exists()
    assert set(s3.list_names(url)) == _set_names(photo_shards)
