"""Bounded parsing of JSON and YAML read from files, stores and the command line.

Every parser of untrusted text goes through here: the size is checked before parsing, the nesting
depth and (YAML) the size once aliases are expanded while parsing, and bytes that are not UTF-8 are refused. Each
failure is one `error(...)` line naming `where` and the problem; no RecursionError, MemoryError or
UnicodeDecodeError escapes.
"""

from __future__ import annotations

import json
from typing import Any

from shard_tools.errors import UserError

MAX_DEPTH = 64  # containers inside containers; the formats read here need fewer than 10
MAX_EXPANDED = 100_000  # YAML values once every `*alias` is expanded; a config has a few hundred
JSON_MAX_BYTES = 64 << 20  # a manifest of a large set is a few MB
YAML_MAX_BYTES = 1 << 20  # a config file is a few KB


class ParseLimitError(ValueError):
    """Text over a parsing limit (size, depth, aliases); the message says which."""


def _depth_problem(value: Any, max_depth: int) -> str | None:
    """'nested deeper than N levels' when `value` is, else None (walked without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list, tuple)):
            if depth > max_depth:
                return f"nested deeper than {max_depth} levels"
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list, tuple)))
    return None


def decode_text(data: bytes | str, where: str, error: type[UserError], *, max_bytes: int, fix: str) -> str:
    """`data` as text: at most `max_bytes`, UTF-8; else one `error` line naming `where` and `fix`."""
    if len(data) > max_bytes:
        raise error(f"{where}: {len(data)} bytes, over the {max_bytes}-byte limit for this file; {fix}")
    if isinstance(data, str):
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{where}: not UTF-8 text (byte {exc.start} is 0x{data[exc.start]:02x}); {fix}") from None


def load_json(data: bytes | str, where: str, error: type[UserError], *, fix: str,
              max_bytes: int = JSON_MAX_BYTES, max_depth: int = MAX_DEPTH) -> Any:
    """The JSON value in `data`, within the size and depth limits; one `error` line otherwise."""
    text = decode_text(data, where, error, max_bytes=max_bytes, fix=fix)
    try:
        value = json.loads(text)
    except RecursionError:
        raise error(f"{where}: not valid JSON (nested deeper than {max_depth} levels); {fix}") from None
    except ValueError as exc:
        raise error(f"{where}: not valid JSON ({str(exc)[:80]}); {fix}") from None
    problem = _depth_problem(value, max_depth)
    if problem:
        raise error(f"{where}: not valid JSON ({problem}); {fix}")
    return value


def _bounded_loader(max_depth: int, max_expanded: int):
    import yaml

    class BoundedSafeLoader(yaml.SafeLoader):
        """yaml's SafeLoader that refuses deep nesting, and documents whose aliases expand to too many
        values, while composing the nodes: before anything is built, printed or walked."""

        def __init__(self, stream: str) -> None:
            super().__init__(stream)
            self._depth = 0
            self._sizes: dict[int, int] = {}  # node id -> values in it, aliases expanded

        def compose_node(self, parent, index):  # noqa: ANN001, ANN201 - yaml's own signature
            self._depth += 1
            try:
                if self._depth > max_depth:
                    raise ParseLimitError(f"nested deeper than {max_depth} levels")
                node = super().compose_node(parent, index)
            finally:
                self._depth -= 1
            if id(node) not in self._sizes:
                children = node.value if isinstance(node, yaml.SequenceNode) else (
                    [part for pair in node.value for part in pair] if isinstance(node, yaml.MappingNode) else [])
                self._sizes[id(node)] = 1 + sum(self._sizes.get(id(child), 1) for child in children)
            if self._sizes[id(node)] > max_expanded:
                raise ParseLimitError(f"its aliases expand to more than {max_expanded} values")
            return node

    return BoundedSafeLoader


def load_yaml(data: bytes | str, where: str, error: type[UserError], *, fix: str,
              max_bytes: int = YAML_MAX_BYTES, max_depth: int = MAX_DEPTH, max_expanded: int = MAX_EXPANDED) -> Any:
    """The YAML value in `data` (safe types only), within the size, depth and alias-expansion limits."""
    import yaml

    text = decode_text(data, where, error, max_bytes=max_bytes, fix=fix)
    loader = _bounded_loader(max_depth, max_expanded)(text)
    try:
        return loader.get_single_data()
    except ParseLimitError as exc:
        raise error(f"{where}: refused ({exc}); {fix}") from None
    except RecursionError:
        raise error(f"{where}: refused (nested deeper than {max_depth} levels); {fix}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())[:80]
        raise error(f"{where}: not valid YAML{at} ({problem}); {fix}") from None
    finally:
        loader.dispose()
