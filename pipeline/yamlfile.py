"""The one way YAML files are read: run configurations (`validate`, `run`, `stage`, the config a Job reads) and
SelfLengthenRun manifests (`operator validate`).

Hostile input is refused here, before any of it is validated, with one line `FILE:LINE:COLUMN: what is wrong`:
- at most MAX_BYTES of strict UTF-8 (a byte-order mark is allowed);
- at most MAX_DEPTH nested collections, built without recursion (deep nesting cannot exhaust the stack), each of at
  most MAX_ENTRIES entries;
- anchors and aliases limited in number, and what aliases expand to limited in size (no alias bombs);
  recursive aliases and redefined anchors refused;
- duplicate keys refused (never silently last-wins), and keys must be strings;
- scalars typed as the YAML 1.2 core schema does: null, true/false, integers, floats, everything else a string
  (no implicit dates, sexagesimals, yes/no booleans or merge keys of YAML 1.1);
- only the core tags (!!str, !!int, !!float, !!bool, !!null, !!seq, !!map): python tags and the like are refused.

The events come from libyaml (PyYAML's C parser); composing them into plain dicts, lists and scalars is ours.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import yaml
from yaml.events import (
    AliasEvent,
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
    StreamEndEvent,
)

try:
    from yaml._yaml import CParser as _Parser
except ImportError:  # PyYAML without libyaml: the pure-Python parser produces the same events
    from yaml.parser import Parser as _PyParser
    from yaml.reader import Reader
    from yaml.scanner import Scanner

    class _Parser(Reader, Scanner, _PyParser):  # type: ignore[no-redef]
        def __init__(self, stream):
            Reader.__init__(self, stream)
            Scanner.__init__(self)
            _PyParser.__init__(self)


MAX_BYTES = 1024 * 1024  # also the size of a ConfigMap; real configurations are a few KiB
MAX_DEPTH = 64
MAX_ANCHORS = 100
MAX_ALIASES = 100
MAX_ALIAS_NODES = 10_000  # nodes that all aliases together may expand to
MAX_INT_DIGITS = 64
MAX_ENTRIES = 5_000  # items of one list or mapping (the CRD's lists hold at most 64; validating 50,000 takes seconds)

_TAG = "tag:yaml.org,2002:"
_NULL = re.compile(r"^(?:~|null|Null|NULL|)$")
_BOOL = {"true": True, "True": True, "TRUE": True, "false": False, "False": False, "FALSE": False}
_INT10 = re.compile(r"^[-+]?[0-9]+$")
_INT8 = re.compile(r"^0o[0-7]+$")
_INT16 = re.compile(r"^0x[0-9a-fA-F]+$")
_FLOAT = re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$")
_INF = re.compile(r"^[-+]?\.(?:inf|Inf|INF)$")
_NAN = re.compile(r"^\.(?:nan|NaN|NAN)$")
_UNSET = object()
_MAYBE_NOT_STR = frozenset("0123456789+-.~nNtTfF")  # how non-strings start: a fast path for the rest


class YAMLFileError(ValueError):
    """A file that is not acceptable YAML; the message is one line naming the file, line and column."""


def shorten(text: str, limit: int = 200) -> str:
    """At most `limit` characters of a value, for messages (a megabyte value is not echoed back)."""
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _where(path: str, mark) -> str:
    return f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)


class _Refused(Exception):
    def __init__(self, mark, problem: str):
        super().__init__(problem)
        self.mark, self.problem = mark, problem


def _scalar(event: ScalarEvent):
    tag, value = event.tag, event.value
    if tag in (None, "!"):
        if not event.implicit[0] or (value and value[0] not in _MAYBE_NOT_STR):  # quoted, or surely a string
            return value
        tag = _resolve(value)
    elif not tag.startswith(_TAG) or tag[len(_TAG):] not in ("str", "int", "float", "bool", "null"):
        raise _Refused(event.start_mark, f"tag {shorten(tag, 60)} is not allowed (only plain YAML values)")
    kind = tag[len(_TAG):]
    if kind == "str":
        return value
    if kind == "null":
        if not _NULL.match(value):
            raise _Refused(event.start_mark, f"{shorten(value, 60)!r} is not a null")
        return None
    if kind == "bool":
        if value not in _BOOL:
            raise _Refused(event.start_mark, f"{shorten(value, 60)!r} is not true or false")
        return _BOOL[value]
    if kind == "int":
        digits = value.lstrip("+-")
        if len(digits) > MAX_INT_DIGITS:
            raise _Refused(event.start_mark, f"an integer of more than {MAX_INT_DIGITS} digits")
        if _INT10.match(value):
            return int(value)
        if _INT8.match(value):
            return int(value[2:], 8)
        if _INT16.match(value):
            return int(value[2:], 16)
        raise _Refused(event.start_mark, f"{shorten(value, 60)!r} is not an integer")
    if _INF.match(value):
        return -math.inf if value.startswith("-") else math.inf
    if _NAN.match(value):
        return math.nan
    if _FLOAT.match(value) or _INT10.match(value):
        if len(value) > 400:
            raise _Refused(event.start_mark, "a number of more than 400 characters")
        return float(value)
    raise _Refused(event.start_mark, f"{shorten(value, 60)!r} is not a number")


def _resolve(value: str) -> str:
    """The YAML 1.2 core schema's tag of a plain scalar."""
    if _NULL.match(value):
        return _TAG + "null"
    if value in _BOOL:
        return _TAG + "bool"
    if _INT10.match(value) or _INT8.match(value) or _INT16.match(value):
        return _TAG + "int"
    if _FLOAT.match(value) or _INF.match(value) or _NAN.match(value):
        return _TAG + "float"
    return _TAG + "str"


class _Collection:
    __slots__ = ("value", "anchor", "nodes_before", "key", "key_mark")

    def __init__(self, value, anchor, nodes_before):
        self.value, self.anchor, self.nodes_before = value, anchor, nodes_before
        self.key = _UNSET
        self.key_mark = None


def _check_collection_tag(event, kind: str) -> None:
    if event.tag not in (None, "!", _TAG + kind):
        raise _Refused(event.start_mark, f"tag {shorten(event.tag, 60)} is not allowed (only plain YAML values)")


def _document(parser) -> object:
    """Compose one document's events into plain Python values, iteratively, enforcing the limits."""
    stack: list[_Collection] = []
    anchors: dict[str, tuple[object, int]] = {}
    open_anchors: set[str] = set()
    nodes = alias_nodes = aliases = 0
    root = _UNSET

    def add(value, mark) -> None:
        nonlocal root
        if not stack:
            root = value
            return
        top = stack[-1]
        if len(top.value) >= MAX_ENTRIES:
            raise _Refused(mark, f"a list or mapping of more than {MAX_ENTRIES} entries")
        if isinstance(top.value, list):
            top.value.append(value)
        elif top.key is _UNSET:
            if not isinstance(value, str):
                raise _Refused(mark, f"a mapping key must be a string, not {type(value).__name__} "
                               f"{shorten(repr(value), 60)} (quote it)")
            if value in top.value:
                raise _Refused(mark, f"duplicate key {shorten(value, 60)!r}")
            top.key, top.key_mark = value, mark
        else:
            top.value[top.key] = value
            top.key = _UNSET

    def anchored(event) -> None:
        if event.anchor is None:
            return
        if event.anchor in anchors or event.anchor in open_anchors:
            raise _Refused(event.start_mark, f"anchor {shorten(event.anchor, 60)!r} is defined twice")
        if len(anchors) + len(open_anchors) >= MAX_ANCHORS:
            raise _Refused(event.start_mark, f"more than {MAX_ANCHORS} anchors")

    while root is _UNSET:
        event = parser.get_event()
        if isinstance(event, AliasEvent):
            aliases += 1
            if aliases > MAX_ALIASES:
                raise _Refused(event.start_mark, f"more than {MAX_ALIASES} aliases")
            if event.anchor in open_anchors:
                raise _Refused(event.start_mark, f"alias *{shorten(event.anchor, 60)} refers to itself")
            if event.anchor not in anchors:
                raise _Refused(event.start_mark, f"alias *{shorten(event.anchor, 60)} has no anchor before it")
            value, size = anchors[event.anchor]
            alias_nodes += size
            if alias_nodes > MAX_ALIAS_NODES:
                raise _Refused(event.start_mark, f"aliases expand to more than {MAX_ALIAS_NODES} values")
            nodes += size
            add(copy.deepcopy(value), event.start_mark)
        elif isinstance(event, ScalarEvent):
            anchored(event)
            value = _scalar(event)
            nodes += 1
            if event.anchor is not None:
                anchors[event.anchor] = (value, 1)
            add(value, event.start_mark)
        elif isinstance(event, (SequenceStartEvent, MappingStartEvent)):
            mapping = isinstance(event, MappingStartEvent)
            _check_collection_tag(event, "map" if mapping else "seq")
            anchored(event)
            if len(stack) >= MAX_DEPTH:
                raise _Refused(event.start_mark, f"nested more than {MAX_DEPTH} levels deep")
            if stack and not isinstance(stack[-1].value, list) and stack[-1].key is _UNSET:
                raise _Refused(event.start_mark, "a mapping key must be a string, not a collection")
            if event.anchor is not None:
                open_anchors.add(event.anchor)
            stack.append(_Collection({} if mapping else [], event.anchor, nodes))
            nodes += 1
        elif isinstance(event, (SequenceEndEvent, MappingEndEvent)):
            done = stack.pop()
            if done.anchor is not None:
                open_anchors.discard(done.anchor)
                anchors[done.anchor] = (done.value, nodes - done.nodes_before)
            add(done.value, event.start_mark)
        else:  # pragma: no cover - libyaml emits nothing else inside a document
            raise _Refused(event.start_mark, f"unexpected {type(event).__name__}")
    return root


def _parse(text: str) -> list[tuple[object, object]]:
    """(value, start mark) of every document."""
    parser = _Parser(text)
    try:
        documents = []
        parser.get_event()  # StreamStartEvent
        while not parser.check_event(StreamEndEvent):
            start = parser.get_event()  # DocumentStartEvent
            documents.append((_document(parser), start.start_mark))
            parser.get_event()  # DocumentEndEvent
        return documents
    finally:
        dispose = getattr(parser, "dispose", None)
        if dispose:
            dispose()


def _decode(path: str, data: bytes) -> str:
    if len(data) > MAX_BYTES:
        raise YAMLFileError(f"{path}:1:1: more than the {MAX_BYTES} bytes a YAML file may have")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise YAMLFileError(f"{path}:{line}:{column}: not UTF-8 text (byte 0x{data[err.start]:02x})") from None
    return text.removeprefix("\ufeff")


def parse_documents(data: bytes | str, path: str = "<input>") -> list[object]:
    """Every document of a YAML stream as plain values; YAMLFileError (one line) for anything refused."""
    return [value for value, _ in _parse_marked(data, path)]


def _parse_marked(data: bytes | str, path: str) -> list[tuple[object, object]]:
    text = _decode(path, data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data)
    try:
        return _parse(text)
    except _Refused as err:
        raise YAMLFileError(f"{_where(path, err.mark)}: {err.problem}") from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        problem = " ".join(p for p in (err.context, err.problem) if p) or "not valid YAML"
        raise YAMLFileError(f"{_where(path, mark)}: not valid YAML: {shorten(problem, 200)}") from None
    except yaml.YAMLError as err:  # reader errors (control characters) and the like
        mark = getattr(err, "problem_mark", None)
        detail = getattr(err, "reason", None) or str(err).splitlines()[0]
        position = getattr(err, "position", None)
        if mark is None and position is not None:
            line = text.count("\n", 0, position) + 1
            column = position - (text.rfind("\n", 0, position) + 1) + 1
            raise YAMLFileError(f"{path}:{line}:{column}: not valid YAML: {shorten(detail, 200)}") from None
        raise YAMLFileError(f"{_where(path, mark)}: not valid YAML: {shorten(detail, 200)}") from None


def read_bytes(path: str | Path) -> bytes:
    """At most MAX_BYTES (+1, to tell a larger file) of a file; YAMLFileError naming it when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read(MAX_BYTES + 1)
    except OSError as err:
        raise YAMLFileError(f"{path}: cannot read: {err.strerror or err}") from None  # no line: no file


def load_documents(path: str | Path) -> list[object]:
    """Every document of a YAML file (empty documents as None)."""
    return parse_documents(read_bytes(path), str(path))


def load_mapping(path: str | Path, what: str) -> dict:
    """The one document of a file, which must be a mapping (an empty file is an empty mapping)."""
    documents = _parse_marked(read_bytes(path), str(path))
    if len(documents) > 1:
        raise YAMLFileError(f"{_where(path, documents[1][1])}: a second YAML document; a {what} is one")
    data, mark = documents[0] if documents else (None, None)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise YAMLFileError(f"{_where(path, mark)}: a {what} is a mapping at the top level, not a {_kind(data)}")
    return data


def _kind(value: object) -> str:
    return {list: "list", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(value), "value")


class _Dumper(yaml.SafeDumper):
    """SafeDumper that also quotes strings the YAML 1.2 core schema would read as something else (`0o17`)."""


def _represent_str(dumper: yaml.SafeDumper, value: str):
    if _resolve(value) != _TAG + "str" or not value.isprintable():  # escaped: NEL, LS, ... are line breaks
        return dumper.represent_scalar(_TAG + "str", value, style='"')
    return yaml.SafeDumper.represent_str(dumper, value)


_Dumper.add_representer(str, _represent_str)


def dump(data: object, **kwargs) -> str:
    """YAML that this module reads back as the same values."""
    return yaml.dump(data, Dumper=_Dumper, **kwargs)
