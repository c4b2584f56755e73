"""A small renderer for the plain subset of Helm templates that charts/switchyard uses.

`helm` cannot be installed on the machines this project is built on, so the chart checks
render the templates with this module instead. It implements Go text/template semantics for
what the chart needs (actions with whitespace trimming, if/else if/else, with, range over
lists and maps with variables, define/include, pipelines, variables) and the Helm/Sprig
functions the chart calls. Any other function or construct raises `TemplateError`, so a
template that strays from the subset fails the checks instead of rendering wrongly.

Known differences from Helm (stated so nobody relies on them): `.Capabilities` has only
`APIVersions.Has` (and `KubeVersion.Version`), fed from the caller's list like
`helm template --api-versions`; no `tpl`, `lookup` or `required`; values are validated against values.schema.json as Helm does, but the
error text differs; numbers print as Go's `%v` would for float64, which is what Helm does.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable

import jsonschema
import yaml


class TemplateError(Exception):
    """A template outside the supported subset, or one that Helm would also reject."""


# ---------------------------------------------------------------------------------------------
# Lexing: split a template into text and actions, honouring `{{-` / `-}}` trim markers and
# string literals that contain `}}`.


@dataclass
class Action:
    body: str
    line: int


def _scan(src: str, name: str) -> list[str | Action]:
    items: list[str | Action] = []
    pos = 0
    pending_rtrim = False
    while True:
        start = src.find("{{", pos)
        text = src[pos:] if start < 0 else src[pos:start]
        if pending_rtrim:
            text = text.lstrip(" \t\r\n")
        if start < 0:
            if text:
                items.append(text)
            return items
        i = start + 2
        ltrim = src.startswith("- ", i) or src.startswith("-\t", i) or src.startswith("-\n", i)
        if ltrim:
            text = text.rstrip(" \t\r\n")
            i += 1
        if text:
            items.append(text)
        # Find the closing braces, skipping over string literals and comments.
        j = i
        quote = None
        while j < len(src):
            c = src[j]
            if quote:
                if c == "\\" and quote == '"':
                    j += 2
                    continue
                if c == quote:
                    quote = None
            elif src.startswith("/*", j):
                end = src.find("*/", j + 2)
                if end < 0:
                    raise TemplateError(f"{name}: unclosed comment")
                j = end + 2
                continue
            elif c in "\"`'":
                quote = c
            elif src.startswith("}}", j):
                break
            j += 1
        else:
            raise TemplateError(
                f"{name}: unclosed action at line {src.count(chr(10), 0, start) + 1}"
            )
        body = src[i:j]
        rtrim = False
        if re.search(r"\s-$", body):
            rtrim = True
            body = body[:-1]
        body = body.strip()
        line = src.count("\n", 0, start) + 1
        if not (body.startswith("/*") and body.endswith("*/")):
            items.append(Action(body, line))
        pos = j + 2
        pending_rtrim = rtrim


# ---------------------------------------------------------------------------------------------
# Parsing actions into a tree.

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<str>"(?:[^"\\]|\\.)*")
      | (?P<raw>`[^`]*`)
      | (?P<num>-?\d+(?:\.\d+)?)
      | (?P<decl>:=)
      | (?P<assign>=)
      | (?P<pipe>\|)
      | (?P<lp>\()
      | (?P<rp>\))
      | (?P<comma>,)
      | (?P<var>\$[A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)
      | (?P<field>(?:\.[A-Za-z0-9_]+)+|\.)
      | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
    )""",
    re.VERBOSE,
)


def _tokens(expr: str) -> list[tuple[str, str]]:
    out = []
    pos = 0
    expr = expr.strip()
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if not m or m.end() == pos:
            raise TemplateError(f"cannot parse {expr[pos:]!r} in {{{{ {expr} }}}}")
        kind = m.lastgroup
        out.append((kind, m.group(kind)))
        pos = m.end()
        while pos < len(expr) and expr[pos].isspace():
            pos += 1
    return out


@dataclass
class Node:
    kind: str  # text | out | if | with | range | define
    text: str = ""
    expr: str = ""
    body: list = field(default_factory=list)
    elses: list = field(default_factory=list)  # for if: [(expr or None, body)]
    line: int = 0


def _parse(items: list[str | Action], name: str) -> tuple[list[Node], dict[str, list[Node]]]:
    defines: dict[str, list[Node]] = {}
    root: list[Node] = []
    stack: list[tuple[Node, list[Node]]] = []
    cur = root
    for it in items:
        if isinstance(it, str):
            cur.append(Node("text", text=it))
            continue
        body = it.body
        word = body.split(None, 1)[0] if body else ""
        rest = body[len(word) :].strip()
        if word in ("if", "with", "range"):
            node = Node(word, expr=rest, line=it.line)
            cur.append(node)
            stack.append((node, cur))
            cur = node.body
        elif word == "define":
            node = Node("define", expr=rest, line=it.line)
            stack.append((node, cur))
            cur = node.body
        elif word == "else":
            if not stack:
                raise TemplateError(f"{name}:{it.line}: else without if")
            node = stack[-1][0]
            if node.kind == "define":
                raise TemplateError(f"{name}:{it.line}: else in define")
            cond = None
            if rest.startswith("if "):
                if node.kind != "if":
                    raise TemplateError(f"{name}:{it.line}: else if in {node.kind}")
                cond = rest[3:].strip()
            elif rest:
                raise TemplateError(f"{name}:{it.line}: unsupported else {rest!r}")
            node.elses.append((cond, []))
            cur = node.elses[-1][1]
        elif word == "end":
            if not stack:
                raise TemplateError(f"{name}:{it.line}: end without block")
            node, cur = stack.pop()
            if node.kind == "define":
                defines[_literal_string(node.expr, name)] = node.body
        elif word in ("template", "block", "break", "continue"):
            raise TemplateError(f"{name}:{it.line}: `{word}` is outside the supported subset")
        else:
            cur.append(Node("out", expr=body, line=it.line))
    if stack:
        raise TemplateError(f"{name}: unclosed {stack[-1][0].kind} from line {stack[-1][0].line}")
    return root, defines


def _literal_string(expr: str, name: str) -> str:
    toks = _tokens(expr)
    if len(toks) != 1 or toks[0][0] != "str":
        raise TemplateError(f"{name}: define needs one string name, got {expr!r}")
    return json.loads(toks[0][1])


# ---------------------------------------------------------------------------------------------
# Values and functions.


class GoInt(int):
    """An int64, as Sprig's `int` returns: printed in full, unlike the float64 of a value."""


def go_format(v: Any) -> str:
    """How Go's text/template prints a value that came from YAML through Helm."""
    if v is None:
        return ""  # Helm turns "<no value>" into an empty string
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, GoInt):
        return str(int(v))
    if isinstance(v, (int, float)):
        # Helm values are float64; %v uses the shortest 'g' form with exponent when exp >= 21
        # or < -4 (strconv 'g' with shortest precision switches at 21 for %v).
        return _go_float(float(v))
    if isinstance(v, str):
        return v
    if isinstance(v, (dict, list)):
        return _go_composite(v)
    return str(v)


def _go_float(f: float) -> str:
    """strconv.FormatFloat(f, 'g', -1, 64): shortest digits, exponent form when the decimal
    exponent is < -4 or >= 6 (why Helm prints a value of 1000000 as 1e+06)."""
    if math.isnan(f) or math.isinf(f):
        raise TemplateError("non-finite number in template output")
    if f == 0:
        return "0"
    sign, digits, e = Decimal(repr(f)).normalize().as_tuple()
    ds = "".join(map(str, digits))
    exp = len(ds) - 1 + e
    neg = "-" if sign else ""
    if exp < -4 or exp >= 6:
        mant = ds[0] + ("." + ds[1:] if len(ds) > 1 else "")
        return f"{neg}{mant}e{'+' if exp >= 0 else '-'}{abs(exp):02d}"
    if e >= 0:
        return neg + ds + "0" * e
    point = len(ds) + e
    if point > 0:
        return neg + ds[:point] + "." + ds[point:]
    return neg + "0." + "0" * (-point) + ds


def _go_composite(v: Any) -> str:
    if isinstance(v, dict):
        return "map[" + " ".join(f"{k}:{_go_composite(v[k])}" for k in sorted(v)) + "]"
    if isinstance(v, list):
        return "[" + " ".join(_go_composite(x) for x in v) + "]"
    return go_format(v)


def truthy(v: Any) -> bool:
    if v is None or v is False:
        return False
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return v != 0
    if isinstance(v, (str, list, dict, tuple)):
        return len(v) > 0
    return True


def to_yaml(v: Any) -> str:
    if v is None:
        return "null"
    out = yaml.safe_dump(v, default_flow_style=False, sort_keys=True, width=10_000)
    # Helm's toYaml strips the trailing newline; safe_dump adds a document end for scalars.
    if out.endswith("\n...\n"):
        out = out[: -len("\n...\n")]
    return out.rstrip("\n")


def _indent(n: Any, s: Any) -> str:
    pad = " " * int(n)
    return "\n".join(pad + line for line in go_format(s).split("\n"))


def _go_int(v: Any) -> GoInt:
    if isinstance(v, bool):
        return GoInt(v)
    if isinstance(v, (int, float)):
        return GoInt(v)
    if isinstance(v, str):
        try:
            return GoInt(v)
        except ValueError:
            return GoInt(0)
    return GoInt(0)


def _compare(op: Callable[[Any, Any], bool]) -> Callable[[Any, Any], bool]:
    def f(a: Any, b: Any) -> bool:
        if type(a) is not type(b) and not (
            isinstance(a, (int, float))
            and isinstance(b, (int, float))
            and not isinstance(a, bool)
            and not isinstance(b, bool)
        ):
            raise TemplateError(f"incompatible types for comparison: {a!r} and {b!r}")
        return op(a, b)

    return f


def _printf(fmt: str, *args: Any) -> str:
    out = []
    it = iter(args)
    i = 0
    while i < len(fmt):
        c = fmt[i]
        if c == "%" and i + 1 < len(fmt):
            verb = fmt[i + 1]
            i += 2
            if verb == "%":
                out.append("%")
                continue
            try:
                arg = next(it)
            except StopIteration:
                out.append(f"%!{verb}(MISSING)")
                continue
            if verb in "sv":
                out.append(go_format(arg))
            elif verb == "d":
                out.append(str(_go_int(arg)))
            elif verb == "q":
                out.append(json.dumps(go_format(arg)))
            else:
                raise TemplateError(f"printf verb %{verb} is outside the supported subset")
            continue
        out.append(c)
        i += 1
    return "".join(out)


def _set(d: dict, k: str, v: Any) -> dict:
    if not isinstance(d, dict):
        raise TemplateError(f"set needs a map, got {d!r}")
    d[k] = v
    return d


def _default(d: Any, v: Any = None) -> Any:
    return v if truthy(v) else d


def _fail(msg: Any) -> Any:
    # Helm aborts the whole render with this prefix.
    raise TemplateError(f"execution error: {go_format(msg)}")


FUNCS: dict[str, Callable[..., Any]] = {
    "fail": _fail,
    "toYaml": to_yaml,
    "fromYaml": lambda s: yaml.safe_load(s) or {},
    "nindent": lambda n, s: "\n" + _indent(n, s),
    "indent": _indent,
    "quote": lambda *a: " ".join(json.dumps(go_format(x)) for x in a if x is not None),
    "default": _default,
    "trunc": lambda n, s: go_format(s)[: int(n)] if int(n) >= 0 else go_format(s)[int(n) :],
    "trimSuffix": lambda suf, s: s[: -len(suf)] if suf and s.endswith(suf) else s,
    "replace": lambda old, new, s: s.replace(old, new),
    "contains": lambda sub, s: sub in s,
    "printf": _printf,
    "int": _go_int,
    "eq": lambda a, *bs: any(a == b for b in bs),
    "ne": lambda a, b: a != b,
    "gt": _compare(lambda a, b: a > b),
    "ge": _compare(lambda a, b: a >= b),
    "lt": _compare(lambda a, b: a < b),
    "le": _compare(lambda a, b: a <= b),
    "not": lambda a: not truthy(a),
    "empty": lambda a: not truthy(a),
    "dict": lambda *kv: {kv[i]: kv[i + 1] for i in range(0, len(kv), 2)},
    "set": _set,
    "base": lambda p: os.path.basename(p),
    "len": lambda a: len(a),
}


# What `helm template` knows without a cluster: the built-in API groups of Kubernetes 1.33
# (the subset the chart asks about). Callers add CRD-backed ones like `--api-versions` does.
BUILTIN_API_VERSIONS = (
    "v1",
    "apps/v1",
    "batch/v1",
    "policy/v1",
    "rbac.authorization.k8s.io/v1",
    "coordination.k8s.io/v1",
    "apiextensions.k8s.io/v1",
)


class APIVersions:
    """`.Capabilities.APIVersions`: `Has "group/version"` or `Has "group/version/Kind"`."""

    def __init__(self, versions: tuple[str, ...] | list[str]):
        self._versions = set(versions)

    def Has(self, version: str) -> bool:  # noqa: N802 - Helm's method name
        if version in self._versions:
            return True
        # "group/version/Kind" is also satisfied by a listed "group/version/Kind" only; a bare
        # "group/version" entry matches any kind of it, as Helm's list of served versions does.
        parts = version.split("/")
        return len(parts) == 3 and "/".join(parts[:2]) in self._versions


class Files:
    """`.Files` of a chart: every file outside templates/ (Helm's rule)."""

    def __init__(self, chart_dir: Path, extra: dict[str, str] | None = None):
        self._files: dict[str, str] = {}
        for p in sorted(chart_dir.rglob("*")):
            rel = p.relative_to(chart_dir).as_posix()
            if p.is_file() and not rel.startswith("templates/"):
                self._files[rel] = p.read_text()
        self._files.update(extra or {})

    def Glob(self, pattern: str) -> dict[str, str]:  # noqa: N802 - Helm's method name
        # Helm compiles globs with '/' as separator: `*` never crosses a directory.
        rx = re.compile(
            "^"
            + "".join(
                "[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c) for c in pattern
            )
            + "$"
        )
        return {k: v for k, v in sorted(self._files.items()) if rx.match(k)}

    def Get(self, path: str) -> str:  # noqa: N802 - Helm's method name
        return self._files.get(path, "")


# ---------------------------------------------------------------------------------------------
# Evaluation.


class _Renderer:
    def __init__(self, defines: dict[str, list[Node]], name: str):
        self.defines = defines
        self.name = name

    def render(self, nodes: list[Node], dot: Any, vars_: dict[str, Any]) -> str:
        out: list[str] = []
        vars_ = dict(vars_)  # variables are scoped to the block
        declared: set[str] = set()
        for n in nodes:
            if n.kind == "text":
                out.append(n.text)
            elif n.kind == "out":
                decl = re.match(r"^(\$[A-Za-z0-9_]*)\s*(:=|=)\s*(.*)$", n.expr, re.S)
                if decl:
                    var, op, expr = decl.groups()
                    if op == ":=":
                        declared.add(var)
                    elif var not in declared:
                        # Go assigns to the enclosing block's variable; this renderer copies
                        # variables per block, so it would silently drop the new value.
                        raise TemplateError(
                            f"{self.name}:{n.line}: assigning {var} declared outside this block"
                            " is outside the supported subset"
                        )
                    vars_[var] = self.pipeline(expr, dot, vars_, n.line)
                else:
                    out.append(go_format(self.pipeline(n.expr, dot, vars_, n.line)))
            elif n.kind == "if":
                branches = [(n.expr, n.body)] + n.elses
                for cond, body in branches:
                    if cond is None or truthy(self.pipeline(cond, dot, vars_, n.line)):
                        out.append(self.render(body, dot, vars_))
                        break
            elif n.kind == "with":
                v = self.pipeline(n.expr, dot, vars_, n.line)
                if truthy(v):
                    out.append(self.render(n.body, v, vars_))
                elif n.elses:
                    out.append(self.render(n.elses[0][1], dot, vars_))
            elif n.kind == "range":
                m = re.match(
                    r"^(\$[A-Za-z0-9_]*)(?:\s*,\s*(\$[A-Za-z0-9_]*))?\s*:=\s*(.*)$", n.expr, re.S
                )
                kvar = vvar = None
                expr = n.expr
                if m:
                    a, b, expr = m.groups()
                    kvar, vvar = (a, b) if b else (None, a)
                coll = self.pipeline(expr, dot, vars_, n.line)
                if isinstance(coll, dict):
                    pairs = [(k, coll[k]) for k in sorted(coll)]
                elif isinstance(coll, list):
                    pairs = list(enumerate(coll))
                elif coll is None:
                    pairs = []
                else:
                    raise TemplateError(f"{self.name}:{n.line}: range over {type(coll).__name__}")
                if not pairs and n.elses:
                    out.append(self.render(n.elses[0][1], dot, vars_))
                for k, v in pairs:
                    inner = dict(vars_)
                    if kvar:
                        inner[kvar] = k
                    if vvar:
                        inner[vvar] = v
                    out.append(self.render(n.body, v, inner))
            else:
                raise TemplateError(f"{self.name}:{n.line}: unexpected {n.kind}")
        return "".join(out)

    # A pipeline is commands separated by `|`; each command's result is the last argument of
    # the next one.
    def pipeline(self, expr: str, dot: Any, vars_: dict[str, Any], line: int) -> Any:
        toks = _tokens(expr)
        cmds: list[list[tuple[str, str]]] = [[]]
        depth = 0
        for t in toks:
            if t[0] == "lp":
                depth += 1
            elif t[0] == "rp":
                depth -= 1
            if t[0] == "pipe" and depth == 0:
                cmds.append([])
            else:
                cmds[-1].append(t)
        result: Any = _NOTHING
        for cmd in cmds:
            if not cmd:
                raise TemplateError(f"{self.name}:{line}: empty command in {expr!r}")
            result = self.command(cmd, dot, vars_, line, result)
        return result

    def command(self, cmd, dot, vars_, line, piped) -> Any:
        head_kind, head = cmd[0]
        args_toks = self._split_args(cmd[1:], line)
        if head_kind == "ident" and head not in ("true", "false", "nil"):
            if head in ("and", "or"):
                vals = [lambda t=t: self.operand(t, dot, vars_, line) for t in args_toks]
                if piped is not _NOTHING:
                    vals.append(lambda: piped)
                v = None
                for get in vals:
                    v = get()
                    if (head == "and") != truthy(v):
                        return v
                return v
            args = [self.operand(t, dot, vars_, line) for t in args_toks]
            if piped is not _NOTHING:
                args.append(piped)
            if head == "include":
                if len(args) != 2:
                    raise TemplateError(f"{self.name}:{line}: include needs a name and a context")
                return self.include(args[0], args[1])
            fn = FUNCS.get(head)
            if fn is None:
                raise TemplateError(
                    f"{self.name}:{line}: function {head!r} is outside the supported subset"
                )
            try:
                return fn(*args)
            except TemplateError:
                raise
            except Exception as e:  # a wrong argument, as Helm would also reject
                raise TemplateError(f"{self.name}:{line}: {head}: {e}") from e
        # A value, possibly a method call such as `.Files.Get $path`.
        target = self.operand(
            [cmd[0]],
            dot,
            vars_,
            line,
            call_args=None
            if not args_toks
            else [self.operand(t, dot, vars_, line) for t in args_toks]
            + ([] if piped is _NOTHING else [piped]),
        )
        if not args_toks and piped is not _NOTHING:
            raise TemplateError(f"{self.name}:{line}: cannot pipe into a value")
        return target

    def _split_args(self, toks, line):
        args = []
        i = 0
        while i < len(toks):
            if toks[i][0] == "lp":
                depth = 0
                j = i
                while j < len(toks):
                    if toks[j][0] == "lp":
                        depth += 1
                    elif toks[j][0] == "rp":
                        depth -= 1
                        if depth == 0:
                            break
                    j += 1
                if j >= len(toks):
                    raise TemplateError(f"{self.name}:{line}: unbalanced parentheses")
                args.append(toks[i : j + 1])
                i = j + 1
            elif toks[i][0] == "rp":
                raise TemplateError(f"{self.name}:{line}: unbalanced parentheses")
            else:
                args.append([toks[i]])
                i += 1
        return args

    def operand(self, toks, dot, vars_, line, call_args=None) -> Any:
        if toks[0][0] == "lp":
            # Re-join the tokens inside the parentheses; string tokens keep their quotes.
            return self.pipeline(" ".join(v for _, v in toks[1:-1]), dot, vars_, line)
        kind, v = toks[0]
        if kind == "str":
            return json.loads(v)
        if kind == "raw":
            return v[1:-1]
        if kind == "num":
            return float(v) if "." in v else int(v)
        if kind == "ident":
            if v == "true":
                return True
            if v == "false":
                return False
            if v == "nil":
                return None
            # A function without arguments used as an argument, e.g. `(dict)`.
            return self.command([toks[0]], dot, vars_, line, _NOTHING)
        if kind == "var":
            name, *path = v.split(".")
            if name not in vars_:
                raise TemplateError(f"{self.name}:{line}: undefined variable {name}")
            return self.walk(vars_[name], path, v, line, call_args)
        if kind == "field":
            path = [p for p in v.split(".") if p]
            return self.walk(dot, path, v, line, call_args)
        raise TemplateError(f"{self.name}:{line}: unexpected {v!r}")

    def walk(self, base, path, text, line, call_args):
        cur = base
        for p in path:
            if cur is None:
                raise TemplateError(f"{self.name}:{line}: nil pointer evaluating {text}")
            if isinstance(cur, dict):
                cur = cur.get(p)
            elif hasattr(cur, p):
                cur = getattr(cur, p)
            else:
                raise TemplateError(f"{self.name}:{line}: can't evaluate field {p} in {text}")
        if callable(cur):
            return cur(*(call_args or []))
        if call_args:
            raise TemplateError(f"{self.name}:{line}: {text} is not a method but has arguments")
        return cur

    def include(self, name: str, ctx: Any) -> str:
        body = self.defines.get(name)
        if body is None:
            raise TemplateError(f"no template {name!r} defined")
        return self.render(body, ctx, {"$": ctx})


_NOTHING = object()


# ---------------------------------------------------------------------------------------------
# The chart.


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


@dataclass
class Rendered:
    objects: list[dict]
    notes: str


def render_chart(
    chart_dir: Path,
    values: dict | None = None,
    release_name: str = "switchyard",
    namespace: str = "switchyard-system",
    extra_files: dict[str, str] | None = None,
    api_versions: tuple[str, ...] | list[str] = (),
) -> Rendered:
    """Render the chart like `helm template`: values merged over values.yaml and checked
    against values.schema.json, every template rendered, documents split and parsed."""
    chart = yaml.safe_load((chart_dir / "Chart.yaml").read_text())
    merged = deep_merge(yaml.safe_load((chart_dir / "values.yaml").read_text()) or {}, values or {})
    schema_path = chart_dir / "values.schema.json"
    if schema_path.exists():
        jsonschema.validate(merged, json.loads(schema_path.read_text()))
    ctx = {
        "Values": merged,
        "Release": {
            "Name": release_name,
            "Namespace": namespace,
            "Service": "Helm",
            "IsInstall": True,
            "IsUpgrade": False,
        },
        "Chart": {
            "Name": chart["name"],
            "Version": chart["version"],
            "AppVersion": chart.get("appVersion", ""),
        },
        "Files": Files(chart_dir, extra_files),
        "Capabilities": {
            "APIVersions": APIVersions(list(BUILTIN_API_VERSIONS) + list(api_versions)),
            "KubeVersion": {"Version": "v1.33.0"},
        },
    }
    templates = sorted((chart_dir / "templates").rglob("*"))
    parsed: dict[str, list[Node]] = {}
    defines: dict[str, list[Node]] = {}
    for t in templates:
        if not t.is_file():
            continue
        name = t.relative_to(chart_dir).as_posix()
        root, defs = _parse(_scan(t.read_text(), name), name)
        defines.update(defs)
        parsed[name] = root
    objects: list[dict] = []
    notes = ""
    for name, root in parsed.items():
        base = os.path.basename(name)
        if base.startswith("_"):
            continue
        text = _Renderer(defines, name).render(root, ctx, {"$": ctx})
        if base == "NOTES.txt":
            notes = text
            continue
        for doc in re.split(r"(?m)^---\s*$", text):
            try:
                obj = yaml.safe_load(doc)
            except yaml.YAMLError as e:
                raise TemplateError(f"{name} rendered invalid YAML: {e}\n{doc}") from e
            if obj is None:
                continue
            if not isinstance(obj, dict):
                raise TemplateError(f"{name} rendered a non-object document: {doc!r}")
            objects.append(obj)
    return Rendered(objects, notes)


def main(argv: list[str] | None = None) -> int:
    """`python charts/tests/helm_lite.py [-f values.yaml] [--release NAME] [-n NAMESPACE]`:
    print what the chart renders, like `helm template`, for review where helm is missing."""
    import argparse
    import sys

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument(
        "chart", nargs="?", default=str(Path(__file__).resolve().parents[1] / "switchyard")
    )
    p.add_argument("-f", "--values", action="append", default=[], help="values file (repeatable)")
    p.add_argument("--release", default="switchyard")
    p.add_argument("-n", "--namespace", default="switchyard-system")
    p.add_argument("--notes", action="store_true", help="also print NOTES.txt")
    p.add_argument(
        "--api-versions", action="append", default=[], help="API version served (repeatable)"
    )
    a = p.parse_args(argv)
    values: dict = {}
    for f in a.values:
        values = deep_merge(values, yaml.safe_load(Path(f).read_text()) or {})
    try:
        r = render_chart(
            Path(a.chart),
            values,
            release_name=a.release,
            namespace=a.namespace,
            api_versions=a.api_versions,
        )
    except jsonschema.ValidationError as e:
        where = ".".join(str(x) for x in e.absolute_path) or "(top level)"
        print(f"helm_lite: failed to validate values at {where}: {e.message}", file=sys.stderr)
        return 1
    except TemplateError as e:
        print(f"helm_lite: failed to render {a.chart}: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(yaml.safe_dump_all(r.objects, sort_keys=False, explicit_start=True))
    if a.notes:
        sys.stdout.write(
            "\n# NOTES.txt\n" + "".join("# " + line + "\n" for line in r.notes.splitlines())
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
