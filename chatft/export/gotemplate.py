"""Render the part of Go's text/template that Ollama chat templates use, to check a translated template.

Supported, with Go's semantics: text; `{{- ` / ` -}}` trimming; `{{ PIPE }}` output; `{{ $x := PIPE }}`;
`{{ if PIPE }}` / `{{ else if PIPE }}` / `{{ else }}` / `{{ end }}`; `{{ range $i, $m := PIPE }}`,
`{{ range PIPE }}` and `{{ range $m := PIPE }}`; operands `.`, `.Field.Field`, `$`, `$x.Field`, "strings",
integers, `(commands)`; the functions eq, ne, and, or, not, len, index, slice. No pipes `|`, no templates.
Anything else raises GoTemplateError (a template this cannot check is not written).
"""

from __future__ import annotations

import json
import re
from typing import Any


class GoTemplateError(ValueError):
    pass


_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_TOKEN = re.compile(r'\s*(\(|\)|"(?:[^"\\]|\\.)*"|[^\s()]+)')


def _lex(text: str) -> list[tuple[str, str]]:
    """[("text", s) | ("action", body)] with Go's trim markers applied to the neighbouring text."""
    out: list[tuple[str, str]] = []
    pos, trim_next = 0, False
    for m in _ACTION.finditer(text):
        chunk = text[pos : m.start()]
        if trim_next:
            chunk = chunk.lstrip(" \t\r\n")
        if m.group(1):
            chunk = chunk.rstrip(" \t\r\n")
        out.append(("text", chunk))
        out.append(("action", m.group(2).strip()))
        pos, trim_next = m.end(), bool(m.group(3))
    tail = text[pos:]
    out.append(("text", tail.lstrip(" \t\r\n") if trim_next else tail))
    return out


def _words(body: str) -> list[str]:
    words, pos = [], 0
    while pos < len(body):
        m = _TOKEN.match(body, pos)
        if not m or not m.group(1):
            break
        words.append(m.group(1))
        pos = m.end()
    if body[pos:].strip():
        raise GoTemplateError(f"cannot read {body!r}")
    return words


def _parse(items: list[tuple[str, str]], pos: int, stop: tuple[str, ...]) -> tuple[list, int, str]:
    """Nodes up to one of the stop keywords; returns (nodes, position after it, the keyword found)."""
    nodes: list = []
    while pos < len(items):
        kind, body = items[pos]
        pos += 1
        if kind == "text":
            if body:
                nodes.append(("text", body))
            continue
        if body.startswith("/*"):
            continue
        head = body.split(None, 1)[0] if body else ""
        if head in ("end", "else") and head in stop:
            return nodes, pos, body
        if head == "if":
            branches, otherwise = [], []
            cond = _words(body[2:])
            while True:
                block, pos, ended = _parse(items, pos, ("end", "else"))
                branches.append((cond, block))
                if ended == "end":
                    break
                if ended.startswith("else if"):
                    cond = _words(ended[len("else if") :])
                    continue
                otherwise, pos, _ = _parse(items, pos, ("end",))
                break
            nodes.append(("if", branches, otherwise))
        elif head == "range":
            spec = body[len("range") :]
            names: list[str] = []
            if ":=" in spec:
                left, spec = spec.split(":=", 1)
                names = [n.strip() for n in left.split(",")]
            block, pos, ended = _parse(items, pos, ("end",))
            if ended != "end":
                raise GoTemplateError("range without end")
            nodes.append(("range", names, _words(spec), block))
        elif re.match(r"^\$\w*\s*:?=", body):
            name, expr = re.split(r"\s*:?=\s*", body, maxsplit=1)
            nodes.append(("set", name, _words(expr)))
        elif head in ("end", "else", "define", "template", "block", "with", "break", "continue"):
            raise GoTemplateError(f"unsupported action {{{{ {body} }}}}")
        else:
            nodes.append(("out", _words(body)))
    if stop:
        raise GoTemplateError(f"missing {{{{ {stop[0]} }}}}")
    return nodes, pos, ""


def _truth(value: Any) -> bool:
    return value not in (None, False, 0, "") and not (isinstance(value, list | dict) and not value)


def _field(value: Any, path: list[str]) -> Any:
    for name in path:
        if not isinstance(value, dict) or name not in value:
            raise GoTemplateError(f"no field {name}")
        value = value[name]
    return value


def _operand(word: str, dot: Any, scope: dict) -> Any:
    if word.startswith('"'):
        return json.loads(word)  # Go's escapes \n \t \" \\ \uXXXX read as JSON's
    if re.fullmatch(r"-?\d+", word):
        return int(word)
    if word in ("true", "false"):
        return word == "true"
    if word == ".":
        return dot
    if word.startswith("."):
        return _field(dot, word[1:].split("."))
    if word.startswith("$"):
        name, *path = word.split(".")
        if name not in scope:
            raise GoTemplateError(f"undefined variable {name}")
        return _field(scope[name], path)
    raise GoTemplateError(f"unknown word {word!r}")


def _call(name: str, args: list[Any]) -> Any:
    if name == "eq":
        return any(args[0] == other for other in args[1:])
    if name == "ne":
        return args[0] != args[1]
    if name == "not":
        return not _truth(args[0])
    if name == "len":
        return len(args[0])
    if name == "index":
        value = args[0]
        for i in args[1:]:
            value = value[i]
        return value
    if name == "slice":
        start, *stop = args[1:3]
        return args[0][start : stop[0]] if stop else args[0][start:]
    raise GoTemplateError(f"unknown function {name}")


def _eval(words: list[str], dot: Any, scope: dict) -> Any:
    """A command: an operand, or a function and its arguments (parenthesized commands nest)."""
    groups: list[Any] = []
    i = 0
    while i < len(words):
        if words[i] == "(":
            depth, j = 1, i + 1
            while depth:
                if j == len(words):
                    raise GoTemplateError("unbalanced parentheses")
                depth += {"(": 1, ")": -1}.get(words[j], 0)
                j += 1
            groups.append(("sub", words[i + 1 : j - 1]))
            i = j
        else:
            groups.append(("word", words[i]))
            i += 1
    if not groups:
        raise GoTemplateError("empty command")
    kind, first = groups[0]
    if kind == "word" and first in ("and", "or"):  # short-circuit, returning the deciding argument (Go 1.18+)
        value = None
        for g in groups[1:]:
            value = _value(g, dot, scope)
            if _truth(value) != (first == "and"):
                return value
        return value
    if kind == "word" and re.fullmatch(r"[a-z]\w*", first) and first not in ("true", "false"):
        return _call(first, [_value(g, dot, scope) for g in groups[1:]])
    if len(groups) > 1:
        raise GoTemplateError(f"{words} is not a function call")
    return _value(groups[0], dot, scope)


def _value(group: tuple[str, Any], dot: Any, scope: dict) -> Any:
    kind, item = group
    return _eval(item, dot, scope) if kind == "sub" else _operand(item, dot, scope)


def _run(nodes: list, dot: Any, scope: dict, out: list[str]) -> None:
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "out":
            value = _eval(node[1], dot, scope)
            out.append(
                "<no value>"
                if value is None
                else str(value).lower()
                if isinstance(value, bool)
                else str(value)
            )
        elif node[0] == "set":
            scope[node[1]] = _eval(node[2], dot, scope)
        elif node[0] == "if":
            for cond, block in node[1]:
                if _truth(_eval(cond, dot, scope)):
                    _run(block, dot, dict(scope), out)
                    break
            else:
                _run(node[2], dot, dict(scope), out)
        elif node[0] == "range":
            items = _eval(node[2], dot, scope)
            for i, item in enumerate(items or []):
                inner = dict(scope)
                if len(node[1]) == 2:
                    inner[node[1][0]], inner[node[1][1]] = i, item
                elif len(node[1]) == 1:
                    inner[node[1][0]] = item
                _run(node[3], item, inner, out)


def render(template: str, data: dict) -> str:
    """template rendered with data (a dict; `.Messages` is a list of {"Role", "Content"} dicts)."""
    nodes, _, _ = _parse(_lex(template), 0, ())
    out: list[str] = []
    _run(nodes, data, {"$": data}, out)
    return "".join(out)
