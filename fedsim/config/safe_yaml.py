"""YAML text -> plain Python values, refusing what a config never needs before building it.

PyYAML's safe loader builds whatever the text describes: a few lines of aliases can stand
for billions of values (an "alias bomb"), thousands of nested brackets overflow Python's
stack, and a repeated key silently keeps its last value. `parse_yaml` composes the node
graph first (aliases stay shared references there, so this is as cheap as the text), checks
it, and only then builds the values. Refused, with the key path and line:

* nesting deeper than `MAX_DEPTH` (counted through aliases);
* more than `MAX_VALUES` values or `MAX_CHARS` characters of text once aliases and merge
  keys (``<<``) are expanded (counted on the graph with memoisation, never expanded);
* an alias that contains itself;
* a key given twice in one mapping (a key that overrides one brought in by ``<<`` is fine);
* keys that are not strings (``1:``, ``on:``, ``null:``) and values that are not plain
  strings, numbers, booleans, null, lists or mappings (dates, ``!!binary``, ``!!set``).
"""
from __future__ import annotations

from typing import Any

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.resolver import Resolver

from ..errors import ConfigError, first_line

MAX_DEPTH = 50
MAX_VALUES = 10_000
MAX_CHARS = 1_000_000

_TAG = "tag:yaml.org,2002:"
_SCALAR_TAGS = {_TAG + t: t for t in ("str", "int", "float", "bool", "null")}
_MERGE = _TAG + "merge"


class MalformedYAML(ConfigError):
    """Text that is not YAML at all (as opposed to YAML that is refused)."""


class _TooDeep(Exception):
    def __init__(self, mark: Any):
        self.mark = mark


try:  # libyaml's parser: its scanner is C (PyYAML's takes ~1 s on a line of 1,000 open brackets)
    from yaml._yaml import CParser
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    CParser = None


if CParser is not None:
    class _Base(Composer, CParser, SafeConstructor, Resolver):  # PyYAML's composer over libyaml's events
        def __init__(self, stream: str):
            CParser.__init__(self, stream)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)
            Composer.__init__(self)
else:  # pragma: no cover
    _Base = yaml.SafeLoader


class _Loader(_Base):
    """The safe loader with a bound on nesting while it composes (the composer recurses per level)."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _TooDeep(self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _line(node: Node) -> str:
    return f"line {node.start_mark.line + 1}, column {node.start_mark.column + 1}"


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


class _GraphCheck:
    """One pass over a composed node graph; each distinct node is measured once."""

    def __init__(self, where: str):
        self.where = where
        self.measured: dict[int, tuple[int, int, int]] = {}  # id(node) -> (values, chars, height)
        self.open: set[int] = set()

    def fail(self, path: str, node: Node, message: str) -> ConfigError:
        return ConfigError(path, f"{message} ({self.where}, {_line(node)})")

    def measure(self, node: Node, path: str, depth: int) -> tuple[int, int, int]:
        """Returns (values, characters, height) of `node` expanded; raises ConfigError past a limit."""
        known = self.measured.get(id(node))
        if known is None:
            if id(node) in self.open:
                raise self.fail(path, node, "an alias refers to a node that contains it")
            self.open.add(id(node))
            known = self._measure_new(node, path, depth)
            self.open.discard(id(node))
            self.measured[id(node)] = known
        values, chars, height = known
        if depth + height > MAX_DEPTH:
            raise self.fail(path, node, f"nested more than {MAX_DEPTH} levels deep")
        if values > MAX_VALUES:
            raise self.fail(path, node, f"expands to more than {MAX_VALUES:,} values (through aliases); "
                                        "a config is a few hundred")
        if chars > MAX_CHARS:
            raise self.fail(path, node, f"expands to more than {MAX_CHARS:,} characters of text (through aliases)")
        return known

    def _measure_new(self, node: Node, path: str, depth: int) -> tuple[int, int, int]:
        if depth > MAX_DEPTH:
            raise self.fail(path, node, f"nested more than {MAX_DEPTH} levels deep")
        if isinstance(node, ScalarNode):
            if node.tag not in _SCALAR_TAGS:
                kind = node.tag.removeprefix(_TAG)
                raise self.fail(path, node, f"a YAML {kind} is not a config value (quote it to make it a string)")
            return 1, len(node.value), 0
        if isinstance(node, SequenceNode):
            if node.tag != _TAG + "seq":
                raise self.fail(path, node, f"a YAML {node.tag.removeprefix(_TAG)} is not a config value")
            children = [self.measure(item, _join(path, i), depth + 1) for i, item in enumerate(node.value)]
        else:
            assert isinstance(node, MappingNode)
            if node.tag != _TAG + "map":
                raise self.fail(path, node, f"a YAML {node.tag.removeprefix(_TAG)} is not a config value")
            children = []
            seen: dict[str, Node] = {}
            for key, value in node.value:
                if key.tag == _MERGE:
                    children.append(self.measure(value, path, depth))  # merged keys land at this level
                    continue
                if not isinstance(key, ScalarNode) or key.tag != _TAG + "str":
                    shown = key.value if isinstance(key, ScalarNode) else "a " + key.id
                    raise self.fail(path, key, f"keys must be strings, got {shown!r} (put it in quotes)")
                child = _join(path, key.value)
                if key.value in seen:
                    raise ConfigError(child, f"given twice ({self.where}: {_line(seen[key.value])}, then "
                                             f"{_line(key)}); remove one")
                seen[key.value] = key
                children.append((1, len(key.value), 0))
                children.append(self.measure(value, child, depth + 1))
        return (1 + sum(c[0] for c in children), sum(c[1] for c in children),
                1 + max((c[2] for c in children), default=0))


def parse_yaml(text: str, where: str) -> Any:
    """Returns the value of the YAML document `text`, after checking its node graph (see the
    module docstring). Raises ConfigError naming `where` (a file, an override) for malformed
    YAML and for every refusal."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _GraphCheck(where).measure(node, "", 0)
        return loader.construct_document(node)
    except _TooDeep as exc:
        raise ConfigError("", f"{where}: nested more than {MAX_DEPTH} levels deep "
                              f"(line {exc.mark.line + 1})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        if "maximum nesting depth" in str(exc):  # libyaml's own bound (1,000 flow levels)
            at = f" (line {mark.line + 1})" if mark else ""
            raise ConfigError("", f"{where}: nested more than {MAX_DEPTH} levels deep{at}") from None
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or first_line(exc, None)
        raise MalformedYAML("", f"{where}: malformed YAML{at}: {problem}") from None
    finally:
        loader.dispose()
