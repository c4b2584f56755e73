"""helm_lite renders the template subset the way Helm (Go text/template + Sprig) does, so the
chart checks compare what Helm would install."""

from __future__ import annotations

import pytest
from helm_lite import TemplateError, _parse, _Renderer, _scan


def tpl(src: str, values: dict | None = None, **ctx) -> str:
    root, defines = _parse(_scan(src, "t"), "t")
    data = {"Values": values or {}, "Release": {"Name": "rel", "Namespace": "ns"}, **ctx}
    return _Renderer(defines, "t").render(root, data, {"$": data})


@pytest.mark.parametrize(
    "src,out",
    [
        ("a\n  {{- .Values.x }}\nb", "a1\nb"),  # {{- eats the newline and indent before
        ("a\n{{ .Values.x -}}\n  b", "a\n1b"),  # -}} eats what follows
        ("{{- if .Values.no }}x{{- end }}\ny", "\ny"),
        ("{{ .Values.missing }}|", "|"),  # Helm prints a missing value as ""
        ("{{ .Values.big }}", "1e+06"),  # float64 %v, the classic Helm surprise
        ("{{ .Values.big | int }}", "1000000"),  # Sprig's int is an int64: printed in full
        ("{{ .Values.x | quote }}", '"1"'),
        ('{{ "{{ $labels.x }}" }}', "{{ $labels.x }}"),  # a string holding }} stays one action
        ("{{/* a comment */}}z", "z"),
    ],
)
def test_text_and_trimming(src, out):
    assert tpl(src, {"x": 1, "no": False, "big": 1000000}) == out


def test_control_structures():
    values = {"m": {"b": 2, "a": 1}, "l": ["x", "y"], "e": {}, "s": "v"}
    assert tpl("{{ range $k, $v := .Values.m }}{{ $k }}={{ $v }};{{ end }}", values) == "a=1;b=2;"
    assert tpl("{{ range .Values.l }}[{{ . }}]{{ end }}", values) == "[x][y]"
    assert tpl("{{ with .Values.e }}full{{ else }}empty{{ end }}", values) == "empty"
    assert tpl("{{ with .Values.s }}{{ . }}{{ $.Release.Name }}{{ end }}", values) == "vrel"
    assert (
        tpl('{{ if eq .Values.s "w" }}1{{ else if eq .Values.s "v" }}2{{ else }}3{{ end }}', values)
        == "2"
    )
    assert tpl('{{ $x := dict }}{{ $_ := set $x "k" 1 }}{{ $x.k }}', values) == "1"


def test_helpers_and_functions():
    src = (
        '{{- define "n" -}}{{ .Release.Name }}-op{{- end -}}'
        '{{ include "n" . | upper_missing_is_an_error }}'
    )
    with pytest.raises(TemplateError, match="upper_missing_is_an_error"):
        tpl(src)
    src = '{{- define "n" -}}{{ .Release.Name }}-op{{- end -}}{{ include "n" . | trunc 4 }}'
    assert tpl(src) == "rel-"
    assert (
        tpl("{{ toYaml .Values.m | nindent 2 }}", {"m": {"b": [1], "a": "x"}})
        == "\n  a: x\n  b:\n  - 1"
    )
    assert tpl('{{ default "d" .Values.none }} {{ default "d" .Values.s }}', {"s": "v"}) == "d v"
    assert tpl("{{ gt (int .Values.n) 1 }}", {"n": 2}) == "true"
    assert tpl('{{ printf "%s-%s" "a" "b" | replace "-" "_" }}') == "a_b"


def test_assignment_to_an_outer_variable_is_refused_not_dropped():
    # Go would update $x from inside the `if`; a renderer that printed "a" would lie.
    with pytest.raises(TemplateError, match="outside this block"):
        tpl('{{ $x := "a" }}{{ if true }}{{ $x = "b" }}{{ end }}{{ $x }}')
    assert tpl('{{ $x := "a" }}{{ $x = "b" }}{{ $x }}') == "b"


def test_helm_errors_are_errors():
    with pytest.raises(TemplateError, match="nil pointer"):
        tpl("{{ .Values.a.b }}", {})
    with pytest.raises(TemplateError, match="unclosed"):
        tpl("{{ if .Values.a }}x")
    with pytest.raises(TemplateError, match="incompatible types"):
        tpl('{{ gt .Values.a "1" }}', {"a": 2})
