"""Hostile or careless configs: every one is one line naming the file or the setting (exit 2, no
traceback), and a quoted value is escaped and short, however large the input behind it."""

from __future__ import annotations

from pathlib import Path

import pytest

from mt_scale.cli import train_main


@pytest.fixture
def train_error(capsys):
    """Run mt-train --print-config; assert exit 2 and one short error line on stderr; return the message."""

    def run(argv: list[str]) -> str:
        assert train_main([*argv, "--print-config"]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and "Traceback" not in captured.err and captured.err.count("\n") == 1
        assert captured.err.startswith("mt-train: error: ") and len(captured.err) < 400, captured.err[:400]
        return captured.err.strip()[len("mt-train: error: "):]

    return run


def test_config_files_that_are_not_configs(tmp_path: Path, train_error) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(9))
        + "run: {seed: *j}\n")
    assert train_error(["--config", str(bomb)]) == (
        f"{bomb}: refused (its aliases expand to more than 100000 values); fix the file")
    deep = tmp_path / "deep.yaml"
    deep.write_text("run: " + "[" * 5000 + "]" * 5000)
    assert train_error(["--config", str(deep)]) == f"{deep}: refused (nested deeper than 64 levels); fix the file"
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"run:\n  output_dir: caf\xe9\n")
    assert train_error(["--config", str(latin)]) == f"{latin}: not UTF-8 text (byte 22 is 0xe9); fix the file"
    assert train_error(["--config", str(tmp_path)]) == (
        f"{tmp_path}: is a folder, not a config file; give a YAML file to --config")


def test_set_values_are_bounded_and_quoted_short(train_error) -> None:
    message = train_error(["--set", "data.mean=" + "[" * 5000 + "]" * 5000])
    assert message.startswith("override 'data.mean=[[[[") and message.endswith(
        ": refused (nested deeper than 64 levels); write the value as YAML, e.g. 0.05, true or [1, 2]")
    message = train_error(["--set", "run.epochs=[" + "1, " * 10000 + "1]"])
    assert "run.epochs=[1, 1, 1, 1, 1, 1, ...]: expected an integer" in message
    message = train_error(["--set", "optim.name=x", "--set", "mt.consistency=\x1b]0;pwned\x07"])
    assert "\x1b" not in message and "mt.consistency='\\x1b]0;pwned\\x07': use mse or kl" in message


@pytest.mark.parametrize(("setting", "message"), [
    ("run.seed=-1", "run.seed=-1: must be in 0..4294967295"),
    ("run.seed=4294967296", "run.seed=4294967296: must be in 0..4294967295"),
    ("data.seed=-3", "data.seed=-3: must be in 0..4294967295"),
    ("model.in_chans=1", "model.in_chans=1: the shard pipelines give 3-channel RGB images; set model.in_chans=3"),
    ("optim.lr_rampup_epochs=inf", "optim.lr_rampup_epochs=inf: must be a finite number"),
    ("optim.momentum=.nan", "optim.momentum=nan: must be a finite number"),
    ("optim.momentum=1.5", "optim.momentum=1.5: must be in [0, 1)"),
    ("mt.ema_decay=-inf", "mt.ema_decay=-inf: must be a finite number"),
    ("data.std=[0.2, inf, 0.2]", "data.std=(0.2, inf, 0.2): must be a finite number"),
    ("optim.weight_decay=-1", "optim.weight_decay=-1.0: must be >= 0"),
])
def test_settings_are_checked_where_the_config_is_built(train_error, setting: str, message: str) -> None:
    assert train_error(["--preset", "digits-demo", "--set", setting]) == message
