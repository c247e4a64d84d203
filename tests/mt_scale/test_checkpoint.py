"""Checkpoints from someone else never run code; damaged ones, signals and OS errors give one line.

Each case resumes (or starts) a tiny digits run through `mt-train`'s main() or the real console
script, and asserts the exit status, the single stderr line naming the file, and what was (not)
written or executed.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_model

from mt_scale.checkpoint import (
    STUDENT_NAME,
    TRAIN_STATE_NAME,
    TrainState,
    checkpoint_dirs,
    data_state_name,
    rng_state_name,
)
from mt_scale.cli import train_main as main
from mt_scale.config import load_config
from mt_scale.errors import MtScaleError
from mt_scale.model import create_model
from mt_scale.preemption import EXIT_INTERRUPTED, EXIT_PREEMPTED, StopRequest, next_batch
from mt_scale.report import read_metrics
from mt_scale.train import train

# the session's reference runs: every test that reads them runs in one pytest-xdist worker
pytestmark = pytest.mark.xdist_group("reference_runs")

SETTINGS = [
    "data.workers=0",
    "run.epochs=1",
    "optim.lr_rampdown_epochs=1",
    "run.eval_every_epochs=0",
    "run.checkpoint_every_epochs=0",
    "run.log_every_steps=1",
]
# Every file a checkpoint holds on one process, each of which --resume reads.
CHECKPOINT_FILES = {
    "model.safetensors",
    "ema_teacher.safetensors",
    "optimizer.bin",
    "scheduler.bin",
    "random_states_0.pkl",
    "train_state.json",
    "data_state_0.json",
}


class Hostile:
    """Unpickling this runs a shell command: what an attacker puts in a checkpoint file."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def argv(shards: Path, run: Path, *extra: str) -> list[str]:
    sets = [
        item
        for setting in (f"run.shards={shards}", f"run.output_dir={run}", *SETTINGS)
        for item in ("--set", setting)
    ]
    return ["--preset", "digits-demo", *sets, "--no-progress", *extra]


@pytest.fixture(scope="module")
def stopped_run(digits_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run stopped after 3 steps: one complete checkpoint, step-00000003."""
    run = tmp_path_factory.mktemp("ckpt") / "run"
    cfg = load_config(
        "digits-demo", overrides=[f"run.shards={digits_shards}", f"run.output_dir={run}", *SETTINGS]
    )
    train(cfg, progress=False, stop_after_steps=3)
    return run


@pytest.fixture
def run_copy(stopped_run: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A fresh copy of the stopped run and its checkpoint folder."""
    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    return run, checkpoint_dirs(run)[-1]


def resume_fails(shards: Path, run: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    """Resume `run`; assert exit status 2 and exactly one stderr line, and return that line."""
    status = main(argv(shards, run, *extra, "--resume"))
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.startswith("mt-train: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_checkpoint_holds_the_expected_files_and_no_pickled_state(stopped_run: Path) -> None:
    checkpoint = checkpoint_dirs(stopped_run)[-1]
    assert checkpoint.name == "step-00000003"
    assert {p.name for p in checkpoint.iterdir()} == CHECKPOINT_FILES
    record = json.loads((checkpoint / TRAIN_STATE_NAME).read_text())
    assert record["model"] == {"name": "test_resnet", "num_classes": 10}
    assert record["state"]["step"] == 3 and record["state"]["batch_in_epoch"] == 3
    assert json.loads((checkpoint / data_state_name(0)).read_text())["train"]["batches_done"] == 3
    assert any("consistency" in key for key in load_file(str(checkpoint / "ema_teacher.safetensors")))


def test_hostile_payload_runs_code_when_unpickled(tmp_path: Path) -> None:
    # the test's attack is real: loading it the way mt-train used to runs the command
    sentinel = tmp_path / "ran"
    torch.save({"state": Hostile(sentinel)}, tmp_path / "evil.bin")
    torch.load(tmp_path / "evil.bin", weights_only=False)
    assert sentinel.exists()


@pytest.mark.parametrize("kind", ["torch", "pickle"])
@pytest.mark.parametrize("name", sorted(CHECKPOINT_FILES))
def test_hostile_file_is_refused_and_never_runs(
    name: str, kind: str, run_copy, digits_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, checkpoint = run_copy
    sentinel = tmp_path / "pwned"
    target = checkpoint / name
    if kind == "torch":
        torch.save({"state": Hostile(sentinel)}, target)
    else:
        target.write_bytes(pickle.dumps(Hostile(sentinel), protocol=2))
    line = resume_fails(digits_shards, run, capsys)
    assert str(target) in line
    assert not sentinel.exists()


@pytest.mark.parametrize("name", sorted(CHECKPOINT_FILES))
def test_truncated_file_is_named(
    name: str, run_copy, digits_shards: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, checkpoint = run_copy
    target = checkpoint / name
    content = target.read_bytes()
    target.write_bytes(content[: len(content) // 2])
    line = resume_fails(digits_shards, run, capsys)
    assert str(target) in line


@pytest.mark.parametrize("name", sorted(CHECKPOINT_FILES))
def test_missing_file_is_named(
    name: str, run_copy, digits_shards: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, checkpoint = run_copy
    (checkpoint / name).unlink()
    line = resume_fails(digits_shards, run, capsys)
    assert str(checkpoint / name) in line and "missing" in line


def test_invalid_rng_state_is_not_skipped(
    run_copy, digits_shards: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a well-formed file whose content is not an RNG state: Accelerate would log and carry on
    run, checkpoint = run_copy
    target = checkpoint / rng_state_name(0)
    torch.save({"step": 0, "random_state": "not a state"}, target)
    line = resume_fails(digits_shards, run, capsys)
    assert str(target) in line and "not be exact" in line


def test_data_position_of_wrong_shape_is_refused(
    run_copy, digits_shards: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # valid JSON that the loaders would only trip over mid-epoch, with a traceback
    run, checkpoint = run_copy
    target = checkpoint / data_state_name(0)
    position = json.loads(target.read_text())
    position["train"]["worker_batches"] = ["3"]
    target.write_text(json.dumps(position))
    line = resume_fails(digits_shards, run, capsys)
    assert str(target) in line and "position.train.worker_batches[0] is str" in line


def test_another_model_is_refused(run_copy, digits_shards: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run, checkpoint = run_copy
    line = resume_fails(digits_shards, run, capsys, "--set", "model.name=mt_digits_cnn")
    assert str(checkpoint / TRAIN_STATE_NAME) in line
    assert "'test_resnet'" in line and "'mt_digits_cnn'" in line and "model.name" in line


def test_another_class_count_is_refused(
    run_copy, digits_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, checkpoint = run_copy
    five = relabeled_set(digits_shards, tmp_path / "five", classes=5)
    line = resume_fails(five, run, capsys)
    assert str(checkpoint / TRAIN_STATE_NAME) in line and "with 10 classes" in line and "with 5" in line


def test_weights_of_another_shape_are_refused(
    run_copy, digits_shards: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a consistent record, but the student's weights come from a 5-class model
    run, checkpoint = run_copy
    save_model(create_model(load_config("digits-demo").model, 5), str(checkpoint / STUDENT_NAME))
    line = resume_fails(digits_shards, run, capsys)
    assert str(checkpoint / STUDENT_NAME) in line and "size mismatch" in line


def test_old_pickled_checkpoint_is_refused_unread(
    run_copy, digits_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, checkpoint = run_copy
    sentinel = tmp_path / "pwned"
    for name in (TRAIN_STATE_NAME, data_state_name(0)):
        (checkpoint / name).unlink()
    for name in ("custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "data_state_0.pt"):
        torch.save(Hostile(sentinel), checkpoint / name)
    line = resume_fails(digits_shards, run, capsys)
    assert "older mt-scale" in line and str(checkpoint) in line
    assert not sentinel.exists()


def test_stray_pickles_are_never_read(run_copy, digits_shards: Path, tmp_path: Path) -> None:
    # Accelerate's load_state would unpickle custom_checkpoint_*.pkl; mt-train reads only its own files
    run, checkpoint = run_copy
    sentinel = tmp_path / "pwned"
    for name in ("custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "data_state_0.pt"):
        torch.save(Hostile(sentinel), checkpoint / name)
    cfg = load_config(
        "digits-demo", overrides=[f"run.shards={digits_shards}", f"run.output_dir={run}", *SETTINGS]
    )
    result = train(cfg, resume="", progress=False, stop_after_steps=4)  # resumed at step 3: one more step
    assert result.report["stopped_at_step"] == 4
    assert not sentinel.exists()


def test_train_state_fields_are_type_checked(tmp_path: Path) -> None:
    state = TrainState()
    with pytest.raises(MtScaleError, match="'step'"):
        state.load_state_dict({**TrainState().state_dict(), "step": "3"}, source=tmp_path / "x.json")
    with pytest.raises(MtScaleError, match="'class_names'"):
        state.load_state_dict(
            {**TrainState().state_dict(), "class_names": [1, 2]}, source=tmp_path / "x.json"
        )
    state.load_state_dict({**TrainState().state_dict(), "step": 7, "train_seconds": 2}, source="x")
    assert state.step == 7 and state.train_seconds == 2.0


def relabeled_set(shards: Path, out: Path, classes: int) -> Path:
    """The same shards under a manifest that lists only the first `classes` class names."""
    out.mkdir()
    for path in shards.iterdir():
        (out / path.name).symlink_to(path)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["classes"] = manifest["classes"][:classes]
    per_class = manifest["label_split"].get("labeled_per_class")
    if isinstance(per_class, list):  # the manifest check wants one count per class
        manifest["label_split"]["labeled_per_class"] = per_class[:classes]
    (out / "manifest.json").unlink()
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_labels_out_of_range_stop_with_one_line(
    digits_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    five = relabeled_set(digits_shards, tmp_path / "five", classes=5)
    run = tmp_path / "run"
    status = main(argv(five, run))
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1, err
    # the loader (or, for the DALI backend, the trainer) names the shard set, the range and the fix
    assert str(five) in err and "label" in err and "mt-shard verify" in err
    assert "outside 0..4" in err or "5 classes" in err
    assert not run.exists()  # failed before its first checkpoint: no run folder left behind


@pytest.mark.parametrize("where", ["under_file", "proc"])
def test_unusable_output_dir_is_one_line(
    where: str, digits_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if where == "under_file":
        (tmp_path / "file.txt").write_text("a user's file\n")
        run = tmp_path / "file.txt" / "run"
    else:
        run = Path("/proc/mt-scale-test") / "run"
    status = main(argv(digits_shards, run))
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert str(run) in err and "run.output_dir" in err
    assert not run.exists()
    if where == "under_file":
        assert (tmp_path / "file.txt").read_text() == "a user's file\n"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_output_dir_is_one_line(digits_shards: Path, tmp_path: Path, capsys) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    status = main(argv(digits_shards, locked / "run"))
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and str(locked / "run") in err, err


def test_permission_denied_on_config_is_one_line(
    digits_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # root ignores file modes, so the refusal is simulated where the first file of the run is written
    write_bytes = Path.write_bytes

    def refuse(self: Path, *args, **kwargs):
        if self.name == ".config.yaml.partial":  # shard_tools.files.atomic_write's temporary name
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return write_bytes(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_bytes", refuse)
    run = tmp_path / "run"
    status = main(argv(digits_shards, run))
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1, err
    assert str(run / "config.yaml") in err and "Permission denied" in err
    assert not run.exists()


def test_full_disk_while_checkpointing_leaves_nothing(
    digits_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", no_space)  # what Accelerate's save_state writes the optimizer with
    run = tmp_path / "out" / "run"
    status = main(argv(digits_shards, run, "--stop-after-steps", "2"))
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1, err
    assert ".step-00000002.tmp" in err and "No space left on device" in err
    assert not (tmp_path / "out").exists()  # the folders this run created are gone, no half checkpoint


# ---------------------------------------------------------------- signals sent to a real mt-train


def start_mt_train(gate, shards: Path, run: Path, *extra: str) -> subprocess.Popen:
    """mt-train behind the step gate, in its own session (as a terminal or a scheduler runs it), with one
    loader worker."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    args = [*gate.command("mt_scale.cli:train_main"), *argv(shards, run, *extra), "--set", "data.workers=1"]
    # Ctrl-C as a terminal delivers it: a test runner's worker (pytest-xdist) may ignore SIGINT, and a child
    # started with SIGINT ignored keeps ignoring it, so the child gets the default disposition back
    return subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


@pytest.mark.slow
def test_ctrl_c_is_one_line_and_status_130(digits_shards: Path, tmp_path: Path, step_gate) -> None:
    run = tmp_path / "run"
    proc = start_mt_train(step_gate, digits_shards, run, "--set", "run.epochs=4", "--set",
                          "optim.lr_rampdown_epochs=4")
    step_gate.wait(proc)  # step 1 done
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the whole foreground process group, loader worker included
    step_gate.release()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert err.count("\n") == 1 and err.startswith("mt-train: interrupted"), err
    assert not run.exists()  # interrupted before its first checkpoint: nothing left behind


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_continues_exactly(reference_run, torch_thread, digits_shards: Path,
                                                         tmp_path: Path, step_gate) -> None:
    """mt-train with a loader worker, SIGTERMed between steps 1 and 2, then resumed: the reference run."""
    extra = [item for setting in reference_run.overrides for item in ("--set", setting)]
    proc = start_mt_train(step_gate, digits_shards, tmp_path / "split", *extra)  # data.workers=1
    step_gate.wait(proc)  # step 1 done, step 2 not started
    os.killpg(proc.pid, signal.SIGTERM)  # as SLURM or accelerate launch signal: the worker is hit too
    step_gate.release()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err
    # the signal came between steps 1 and 2: the run stops at the next step boundary, after step 2
    assert err.count("\n") == 1 and err.startswith("mt-train: stopped by SIGTERM after step 2;"), err
    assert [p.name for p in checkpoint_dirs(tmp_path / "split")] == ["step-00000002"]

    # the stopped mt-train ran on one thread too (OMP_NUM_THREADS=1)
    with torch_thread():
        resumed = train(reference_run.config(digits_shards, tmp_path / "split", "data.workers=1"), resume="",
                        progress=False)
    straight = reference_run.result
    assert resumed.report["steps"] == straight.report["steps"] == 50
    a = load_file(str(checkpoint_dirs(straight.run_dir)[-1] / STUDENT_NAME))
    b = load_file(str(checkpoint_dirs(tmp_path / "split")[-1] / STUDENT_NAME))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    teacher_a, teacher_b = straight.teacher.state_dict(), resumed.teacher.state_dict()
    for key in teacher_a:
        torch.testing.assert_close(teacher_a[key], teacher_b[key], rtol=1e-5, atol=1e-6)
    split_rows = [r for r in read_metrics(tmp_path / "split" / "metrics.csv") if r["kind"] == "train"]
    straight_rows = [r for r in read_metrics(straight.run_dir / "metrics.csv") if r["kind"] == "train"]
    assert (
        [r["step"] for r in split_rows]
        == [r["step"] for r in straight_rows]
        == [float(s) for s in range(1, 51)]
    )
    assert [r["loss"] for r in split_rows] == pytest.approx([r["loss"] for r in straight_rows], rel=1e-4)


def launch_two(shards: Path, run: Path, *extra: str, gate=None) -> subprocess.Popen:
    """`accelerate launch` of mt-train on two CPU processes (gloo), each one its own rank (behind `gate`)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    accelerate = Path(sys.executable).parent / "accelerate"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    args = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
            *(gate.command("-m")[1:] if gate else ["-m"]), "mt_scale.train", *argv(shards, run, *extra)]  # fmt: skip
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.slow
def test_sigterm_on_one_rank_stops_every_rank_at_one_step(two_rank_run, digits_shards: Path, tmp_path: Path,
                                                          step_gate) -> None:
    """Two ranks, SIGTERM to rank 1 between steps 1 and 2, then resumed: the session's two-rank run.

    The ranks exchange the stop flag at log steps (every 3 here), so both stop after step 3."""
    every_three = ("--set", "run.log_every_steps=3")
    assert two_rank_run.overrides == (*SETTINGS[:-1], "run.log_every_steps=3")  # the same run, uninterrupted
    launcher = launch_two(digits_shards, tmp_path / "split", *every_three, gate=step_gate)
    ranks = step_gate.wait(launcher, count=2)  # both ranks: step 1 done, step 2 not started
    os.kill(ranks[1], signal.SIGTERM)  # rank 1 alone: rank 0 learns it through the all-reduced flag
    step_gate.release()
    launcher.communicate(timeout=300)
    [checkpoint] = checkpoint_dirs(tmp_path / "split")
    stopped_at = json.loads((checkpoint / TRAIN_STATE_NAME).read_text())["state"]["step"]
    assert checkpoint.name == "step-00000003" and stopped_at == 3
    assert {data_state_name(0), data_state_name(1), rng_state_name(1)} <= {p.name for p in checkpoint.iterdir()}

    resumed = launch_two(digits_shards, tmp_path / "split", *every_three, "--resume")
    out, err = resumed.communicate(timeout=400)
    assert resumed.returncode == 0, err[-3000:]
    straight = two_rank_run.out / "run"
    reports = [json.loads((run / "report.json").read_text()) for run in (tmp_path / "split", straight)]
    assert reports[0]["steps"] == reports[1]["steps"] == 12  # floor(604 / 48) = 12 steps per rank
    assert reports[0]["final"] == reports[1]["final"]
    a = load_file(str(checkpoint_dirs(tmp_path / "split")[-1] / STUDENT_NAME))
    b = load_file(str(checkpoint_dirs(straight)[-1] / STUDENT_NAME))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- the stop flag itself


def test_sigterm_sets_the_flag_instead_of_killing() -> None:
    stop = StopRequest().install()
    try:
        signal.raise_signal(signal.SIGTERM)  # the handler has run when this returns
        assert stop.requested and stop.signal_name == "SIGTERM"
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


class FakeLoaders:
    """A position counter whose first iterator dies after two batches, as a SIGTERMed worker does.

    Opening an iterator draws from torch's RNG, as a DataLoader iterator does for its workers' seed.
    """

    def __init__(self) -> None:
        self.position, self.opened = 0, 0
        self.train = self

    def __iter__(self):
        self.opened += 1
        opened = self.opened
        torch.empty((), dtype=torch.int64).random_()
        while True:
            if opened == 1 and self.position == 2:
                raise RuntimeError("DataLoader worker (pid(s) 123) exited unexpectedly")
            self.position += 1
            yield {"index": self.position - 1}

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def test_dead_loader_is_reopened_at_its_position_only_after_sigterm() -> None:
    stop, loaders = StopRequest(), FakeLoaders()
    batches = iter(loaders.train)
    for expected in (0, 1):
        batch, batches = next_batch(batches, loaders, stop)
        assert batch["index"] == expected
    with pytest.raises(RuntimeError, match="exited unexpectedly"):  # no stop requested: a real failure
        next_batch(batches, loaders, stop)

    stop.signal_name, loaders = "SIGTERM", FakeLoaders()
    batches = iter(loaders.train)
    seen = []
    for _ in range(4):
        batch, batches = next_batch(batches, loaders, stop)
        seen.append(batch["index"])
        if len(seen) == 1:
            rng_after_first_open = torch.get_rng_state()
    assert seen == [0, 1, 2, 3] and loaders.opened == 2  # nothing repeated or skipped
    assert torch.equal(torch.get_rng_state(), rng_after_first_open)  # the reopen left no trace in the RNG
