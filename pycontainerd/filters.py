"""containerd's filter language: parse filter strings once, match objects through adaptors.

A filter is a list of strings, OR'ed together; an empty list, or an empty string in it,
matches everything. One string is a ``,``-separated list of selectors, AND'ed::

    selector  := fieldpath [operator value]
    fieldpath := field ("." field)*
    field     := [A-Za-z0-9_]+ | "double-quoted"
    operator  := "==" | "!=" | "~="
    value     := run of characters other than "," and whitespace | quoted

A bare fieldpath tests presence. ``==`` needs the field present and equal; ``!=`` is true
whenever the value (``""`` when absent) differs; ``~=`` searches the value with a regular
expression, which may also be quoted as ``/.../`` or ``|...|`` (handy for slashes in
topics: ``topic~=|^/tasks/|``). Quoted text takes Go-style escapes (``\\n``, ``\\"``,
``\\x41``, ``\\u00e9``...). Examples: ``topic=="/tasks/exit"``, ``namespace==default``,
``labels."io.x/y"==z,name~=^busy``.

Objects are seen through an *adaptor*: a callable taking a field path and returning
``(value, present)``, as containerd's ``filters.Adaptor``. ``field_adaptor`` builds one from a
mapping, ``message_adaptor`` from a protobuf message with the semantics of containerd's
generated ``Field`` methods. Parse errors raise ``InvalidArgument`` with the position marked.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pycontainerd.errdefs import InvalidArgument

if TYPE_CHECKING:
    from google.protobuf.message import Message

__all__ = [
    "ALWAYS",
    "Adaptor",
    "Filter",
    "Operator",
    "Selector",
    "field_adaptor",
    "message_adaptor",
    "message_field",
    "parse",
]

Adaptor = Callable[[Sequence[str]], tuple[str, bool]]
"""Look up a field path on some object: ``(value, present)``."""


class Operator(enum.Enum):
    PRESENT = "?"
    EQUAL = "=="
    NOT_EQUAL = "!="
    MATCHES = "~="


class Selector:
    """One ``fieldpath [op value]`` term, compiled."""

    __slots__ = ("fieldpath", "operator", "regex", "value")

    def __init__(
        self,
        fieldpath: tuple[str, ...],
        operator: Operator,
        value: str = "",
        regex: re.Pattern[str] | None = None,
    ) -> None:
        self.fieldpath = fieldpath
        self.operator = operator
        self.value = value
        self.regex = regex

    def match(self, adaptor: Adaptor) -> bool:
        value, present = adaptor(self.fieldpath)
        op = self.operator
        if op is Operator.EQUAL:
            return present and value == self.value
        if op is Operator.PRESENT:
            return present
        if op is Operator.NOT_EQUAL:
            return value != self.value
        assert self.regex is not None
        return self.regex.search(value) is not None

    def __repr__(self) -> str:
        path = ".".join(self.fieldpath)
        if self.operator is Operator.PRESENT:
            return f"Selector({path})"
        return f"Selector({path}{self.operator.value}{self.value!r})"


class Filter:
    """An OR of AND-clauses of selectors; ``always`` when it matches everything."""

    __slots__ = ("clauses",)

    def __init__(self, clauses: Sequence[Sequence[Selector]]) -> None:
        self.clauses: tuple[tuple[Selector, ...], ...] = tuple(tuple(c) for c in clauses)

    @property
    def always(self) -> bool:
        """True when the filter matches anything (no clauses, or an empty clause)."""
        return not self.clauses or any(not c for c in self.clauses)

    def match(self, adaptor: Adaptor) -> bool:
        if not self.clauses:
            return True
        for clause in self.clauses:
            for sel in clause:
                if not sel.match(adaptor):
                    break
            else:
                return True
        return False

    def __repr__(self) -> str:
        return f"Filter({list(map(list, self.clauses))!r})"


ALWAYS = Filter(())
"""The filter that matches everything."""


def parse(filters: Sequence[str] | str) -> Filter:
    """Compile containerd filter strings (OR'ed); InvalidArgument on a syntax error.

    A bare string is taken as a one-element list, not as a sequence of characters.
    """
    if isinstance(filters, str):
        filters = [filters]
    clauses: list[tuple[Selector, ...]] = []
    for text in filters:
        if not text:
            # containerd treats "" as "match everything", which makes the whole OR true.
            return ALWAYS
        clauses.append(_Parser(text).selectors())
    return Filter(clauses) if clauses else ALWAYS


# --- adaptors --------------------------------------------------------------------------


def _absent(_: Sequence[str]) -> tuple[str, bool]:
    return "", False


def field_adaptor(fields: Mapping[str, Any]) -> Adaptor:
    """An adaptor over a mapping of top-level fields, in containerd's style.

    - ``str`` values are present when non-empty (like generated string fields);
    - ``bool`` values are ``"true"``/``"false"`` and always present; ints are stringified;
    - a nested mapping is a label map: the rest of the path, joined with ``.``, is the key,
      and a key holding ``""`` is still present (``labels."a.b"`` and ``labels.a.b`` agree);
      nested mappings of mappings are walked component by component;
    - a protobuf message delegates to ``message_adaptor``, a callable is used as an adaptor
      for the rest of the path (e.g. ``{"event": lambda path: ...}``).
    """

    def adapt(path: Sequence[str]) -> tuple[str, bool]:
        if not path:
            return "", False
        if path[0] not in fields:
            return "", False
        return _leaf(fields[path[0]], path[1:])

    return adapt


def _leaf(node: Any, rest: Sequence[str]) -> tuple[str, bool]:
    if isinstance(node, str):
        return (node, bool(node)) if not rest else ("", False)
    if isinstance(node, bool):
        return ("true" if node else "false", True) if not rest else ("", False)
    if isinstance(node, int | float):
        return (str(node), True) if not rest else ("", False)
    if isinstance(node, Mapping):
        return _map_lookup(node, rest)
    if node is None:
        return "", False
    if hasattr(node, "DESCRIPTOR") and hasattr(node, "ListFields"):
        return message_field(node, rest)
    if callable(node):
        result: tuple[str, bool] = node(rest)
        return result
    return "", False


def _map_lookup(node: Mapping[str, Any], rest: Sequence[str]) -> tuple[str, bool]:
    if not rest:
        return "", False
    key = ".".join(rest)
    if key in node:
        value = node[key]
        if isinstance(value, str):
            return value, True
        if not isinstance(value, Mapping):
            return _leaf(value, ())
    child = node.get(rest[0])
    if child is None or len(rest) == 1:
        return "", False
    if isinstance(child, Mapping):
        return _map_lookup(child, rest[1:])
    return _leaf(child, rest[1:])


def message_adaptor(msg: Message) -> Adaptor:
    """An adaptor over a protobuf message, matching containerd's generated ``Field`` methods.

    String fields are present when non-empty; bools are ``"true"``/``"false"``; a map field
    named ``labels`` is looked up with the rest of the path joined by ``.``; a
    ``google.protobuf.Any`` is unpacked (unknown types are absent) and walked; other
    singular message fields (not Timestamp) are walked when set. Numbers, enums, repeated
    fields and timestamps are never present, as in containerd.
    """
    return lambda path: message_field(msg, path)


def message_field(msg: Message, path: Sequence[str]) -> tuple[str, bool]:
    """Look ``path`` up on ``msg``; the function behind ``message_adaptor``."""
    if not path:
        return "", False
    fd = msg.DESCRIPTOR.fields_by_name.get(path[0])
    if fd is None:
        return "", False
    rest = path[1:]
    if fd.type == fd.TYPE_STRING and not _is_repeated(fd):
        if rest:
            return "", False
        value: str = getattr(msg, fd.name)
        return value, bool(value)
    if fd.type == fd.TYPE_BOOL and not _is_repeated(fd):
        if rest:
            return "", False
        return ("true" if getattr(msg, fd.name) else "false"), True
    if fd.type != fd.TYPE_MESSAGE:
        return "", False
    sub = fd.message_type
    if sub is None:
        return "", False
    if sub.GetOptions().map_entry:
        if fd.name != "labels" or not rest:
            return "", False
        labels = getattr(msg, fd.name)
        key = ".".join(rest)
        if key in labels:
            return str(labels[key]), True
        return "", False
    if _is_repeated(fd) or sub.full_name == "google.protobuf.Timestamp":
        return "", False
    if not msg.HasField(fd.name):
        return "", False
    child = getattr(msg, fd.name)
    if sub.full_name == "google.protobuf.Any":
        from pycontainerd import typeurl

        try:
            child = typeurl.unpack(child)
        except Exception:
            return "", False
    return message_field(child, rest)


def _is_repeated(fd: Any) -> bool:
    # ``label`` is deprecated in newer protobuf releases in favour of ``is_repeated``.
    rep = getattr(fd, "is_repeated", None)
    if rep is not None:
        return bool(rep)
    return bool(fd.label == fd.LABEL_REPEATED)


# --- parser ----------------------------------------------------------------------------

_FIELD_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")
_OPERATOR_CHARS = frozenset("=!~")
_QUOTES = frozenset('"/|')
_OPERATORS = {"==": Operator.EQUAL, "!=": Operator.NOT_EQUAL, "~=": Operator.MATCHES}
_SIMPLE_ESCAPES = {
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "v": "\v",
    "\\": "\\",
}
_HEX_ESCAPES = {"x": 2, "u": 4, "U": 8}


class _Parser:
    """Recursive descent over one filter string, tracking the position for error messages."""

    __slots__ = ("pos", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, pos: int, msg: str) -> InvalidArgument:
        t = self.text
        where = f"[{t[:pos]} >|{t[pos]}|< {t[pos + 1 :]}]" if pos < len(t) else f"[{t}]"
        return InvalidArgument(f"filters: parse error: {where}: {msg}")

    def skip_space(self) -> None:
        t = self.text
        while self.pos < len(t) and t[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip_space()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def selectors(self) -> tuple[Selector, ...]:
        out = [self.selector()]
        while True:
            ch = self.peek()
            if ch == "":
                return tuple(out)
            if ch != ",":
                raise self.error(self.pos, f"unexpected input: {ch!r}")
            self.pos += 1
            out.append(self.selector())

    def selector(self) -> Selector:
        path = [self.field()]
        while self.peek() == ".":
            self.pos += 1
            path.append(self.field())
        ch = self.peek()
        if ch in ("", ","):
            return Selector(tuple(path), Operator.PRESENT)
        op = self.operator()
        start = self.pos
        value = self.value(allow_alt_quotes=op is Operator.MATCHES)
        regex = None
        if op is Operator.MATCHES:
            try:
                regex = re.compile(value)
            except re.error as exc:
                raise self.error(start, f"invalid regular expression {value!r}: {exc}") from None
        return Selector(tuple(path), op, value, regex)

    def field(self) -> str:
        ch = self.peek()
        start = self.pos
        if ch in _FIELD_CHARS:
            end = start
            t = self.text
            while end < len(t) and t[end] in _FIELD_CHARS:
                end += 1
            self.pos = end
            return t[start:end]
        if ch in _QUOTES:
            text = self.quoted()
            if ch != '"':
                raise self.error(start, 'invalid quote encountered (fields take "..." only)')
            return text
        if ch == "":
            raise self.error(start, "expected field or quoted, got end of input")
        raise self.error(start, "expected field or quoted")

    def operator(self) -> Operator:
        start = self.pos
        t = self.text
        end = start
        while end < len(t) and t[end] in _OPERATOR_CHARS:
            end += 1
        if end == start:
            if start < len(t) and t[start] in _QUOTES:
                self.quoted()  # an unterminated quote is the better explanation, as in Go
            raise self.error(start, 'expected an operator ("=="|"!="|"~=")')
        self.pos = end
        op = _OPERATORS.get(t[start:end])
        if op is None:
            raise self.error(start, f"unsupported operator {t[start:end]!r}")
        return op

    def value(self, *, allow_alt_quotes: bool) -> str:
        ch = self.peek()
        start = self.pos
        if ch == "":
            raise self.error(start, "expected value or quoted, got end of input")
        if ch in _QUOTES:
            text = self.quoted()
            if ch != '"' and not allow_alt_quotes:
                raise self.error(
                    start, f"invalid quote encountered ({ch}...{ch} quoting is only for ~=)"
                )
            return text
        if ch in ",.":
            raise self.error(start, "expected value or quoted")
        t = self.text
        end = start
        while end < len(t) and t[end] != "," and not t[end].isspace():
            if not t[end].isprintable():
                raise self.error(end, "unexpected control character")
            end += 1
        self.pos = end
        return t[start:end]

    def quoted(self) -> str:
        """Read a quoted literal starting at ``self.pos``; Go escapes, the quote escapable."""
        t = self.text
        start = self.pos
        quote = t[start]
        i = start + 1
        out: list[str] = []
        while True:
            if i >= len(t) or t[i] == "\n":
                raise self.error(start, "quoted literal not terminated")
            c = t[i]
            if c == quote:
                self.pos = i + 1
                return "".join(out)
            if c == "\x00":
                raise self.error(i, "unexpected null")
            if c != "\\":
                out.append(c)
                i += 1
                continue
            if i + 1 >= len(t):
                raise self.error(start, "quoted literal not terminated")
            e = t[i + 1]
            if e in _SIMPLE_ESCAPES:
                out.append(_SIMPLE_ESCAPES[e])
                i += 2
            elif e == quote:
                out.append(quote)
                i += 2
            elif e in "01234567":
                digits = t[i + 1 : i + 4]
                if len(digits) < 3 or any(d not in "01234567" for d in digits):
                    raise self.error(i, "illegal octal escape sequence")
                code = int(digits, 8)
                if code > 255:
                    raise self.error(i, "octal escape value > 255")
                out.append(chr(code))
                i += 4
            elif e in _HEX_ESCAPES:
                n = _HEX_ESCAPES[e]
                digits = t[i + 2 : i + 2 + n]
                if len(digits) < n or any(d not in "0123456789abcdefABCDEF" for d in digits):
                    raise self.error(i, "illegal hexadecimal escape sequence")
                code = int(digits, 16)
                if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
                    raise self.error(i, "escape sequence is an invalid Unicode code point")
                out.append(chr(code))
                i += 2 + n
            else:
                raise self.error(i, f"illegal escape sequence \\{e}")
