"""Bounded parsing and one escaping function: a hostile manifest (deep nesting, bytes that are not
UTF-8, a huge string, escape codes in a field of the wrong type) is one line or one escaped value,
never a traceback, a forged line or megabytes of output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shard_tools.bounded import load_json, load_yaml
from shard_tools.cli import main
from shard_tools.errors import UserError
from shard_tools.format import MANIFEST_NAME
from shard_tools.text import escaped, quoted

FORGED = "1\n\x1b]0;pwned\x07set: OK"


def _edit_manifest(set_dir: Path, edit) -> None:
    data = json.loads((set_dir / MANIFEST_NAME).read_text())
    edit(data)
    (set_dir / MANIFEST_NAME).write_text(json.dumps(data))


def test_escape_codes_in_a_field_are_refused_by_info_and_named_by_verify(set_copy: Path, cli_error, capsys) -> None:
    _edit_manifest(set_copy, lambda data: data["val_split"].update(method="fraction", fraction=0.3, seed=FORGED))
    line = cli_error(["info", str(set_copy)])
    assert "val_split.seed is '1\\n\\x1b]0;pwned\\x07set: OK', not a whole number >= 0" in line
    assert "\x1b" not in line
    assert main(["verify", str(set_copy)]) == 1
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    assert "manifest.json: val_split.seed is '1\\n\\x1b]0;pwned\\x07set: OK', not a whole number >= 0" in out
    assert out.splitlines()[-1] == f"{set_copy}: 1 problem(s)"


@pytest.mark.parametrize(("section", "field", "value", "problem"), [
    ("label_split", "seed", "7", "label_split.seed is '7', not a whole number >= 0"),
    ("image", "quality", "90", "image.quality is '90', not 1..100"),
    ("label_split", "note", "x", "label_split.note: unknown field"),
    ("pack_args", "seed", [0, 1], "pack_args.seed is [0, 1], not a single value"),
])
def test_every_nested_manifest_field_is_type_checked(set_copy: Path, capsys, section, field, value, problem) -> None:
    _edit_manifest(set_copy, lambda data: data[section].update({field: value}))
    assert main(["verify", str(set_copy)]) == 1
    assert f"manifest.json: {problem}" in capsys.readouterr().out.splitlines()


def test_deep_nesting_and_bytes_that_are_not_utf8_are_one_line(set_copy: Path, cli_error) -> None:
    manifest = set_copy / MANIFEST_NAME
    manifest.write_text('{"source": ' + "[" * 5000 + "]" * 5000 + "}")
    assert cli_error(["info", str(set_copy)]) == (
        f"mt-shard info: error: {manifest}: not valid JSON (nested deeper than 64 levels); re-pack the set")
    manifest.write_bytes(b'{"source": "caf\xe9"}')
    assert cli_error(["verify", str(set_copy)]) == (
        f"mt-shard verify: error: {manifest}: not UTF-8 text (byte 15 is 0xe9); re-pack the set")


def test_a_huge_string_is_printed_cut(set_copy: Path, capsys) -> None:
    _edit_manifest(set_copy, lambda data: data.update(source="s" * 1_000_000))
    assert main(["info", str(set_copy)]) == 0
    source = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("source:"))
    assert source == "source:   '" + "s" * 155 + "...'"


def test_yaml_alias_bomb_depth_and_tags_are_refused_before_expansion() -> None:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8))
    cases = {
        bomb: "cfg.yaml: refused (its aliases expand to more than 100000 values); fix it",
        "a: " + "[" * 5000 + "]" * 5000: "cfg.yaml: refused (nested deeper than 64 levels); fix it",
        "a: !!python/object/apply:os.system [echo hi]": "cfg.yaml: not valid YAML at line 1, column 4",
        "a: [1, 2\n": "cfg.yaml: not valid YAML at line 2, column 1 (expected ',' or ']', but got '<stream end>')",
    }
    for text, expected in cases.items():
        with pytest.raises(UserError) as refused:
            load_yaml(text, "cfg.yaml", UserError, fix="fix it")
        assert str(refused.value).startswith(expected)
    assert load_yaml("a: &x {b: 1}\nc: *x", "cfg.yaml", UserError, fix="") == {"a": {"b": 1}, "c": {"b": 1}}
    with pytest.raises(UserError, match="over the 10-byte limit"):
        load_json(b"[" + b" " * 20 + b"]", "x.json", UserError, fix="", max_bytes=10)


def test_escaping_is_bounded_for_any_value() -> None:
    nested: list = []
    for _ in range(40):
        nested = [nested] * 9  # 9**40 leaves once expanded: the bounded repr never walks them
    assert len(escaped(nested)) <= 80
    assert escaped("a\nb\x1b[2J\u202e") == "a\\nb\\x1b[2J\\u202e"
    assert quoted("x" * 500) == "'" + "x" * 75 + "...'"


def test_a_deeply_nested_pack_state_is_one_line(tmp_path: Path, cli_error) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / ".mt-shard-pack.json").write_text("[" * 100_000 + "]" * 100_000)
    line = cli_error(["pack", "digits", str(out), "--quiet"])
    assert line == (f"mt-shard pack: error: {out}: holds an unfinished pack with other options; rerun that command "
                    f"or delete {out}")
