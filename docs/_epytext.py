"""
Render txqb's epytext docstrings as reST for autodoc.

Inline markup: C{x} -> ``x``, I{x} -> *x*, B{x} -> **x**, L{x} and
L{label<target>} -> :py:obj:`...` (which, with nitpicky off, renders an
unresolvable name as plain code instead of warning).  Fields: @param,
@type, @return(s), @rtype, @raise(s), @ivar, @cvar, @var become reST field
lists; continuation lines keep their indentation.
"""

import re

_TAGS = "param|type|returns?|rtype|raises?|ivar|cvar|var|keyword|note|see"
_FIELD = re.compile(rf"^(\s*)@({_TAGS})(?:\s+([^:]+?))?\s*:(.*)$")
_FIELDS = {"return": "returns", "raise": "raises"}
_INLINE = {"C": "``{}``", "I": "*{}*", "B": "**{}**", "L": ":py:obj:`{}`"}
_LINK = re.compile(r"^(.*?)\s*<(.+)>$")


def _inline(text: str) -> str:
    """Replace inline markup, allowing balanced braces inside it."""
    out, i = [], 0
    while i < len(text):
        if text[i] in _INLINE and text[i + 1 : i + 2] == "{":
            depth, j = 1, i + 2
            while j < len(text) and depth:
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                j += 1
            if depth == 0:
                body = text[i + 2 : j - 1]  # reST cannot nest markup
                link = _LINK.match(body) if text[i] == "L" else None
                if link:
                    body = f"{link.group(1)} <{link.group(2)}>"
                # reST markup must not touch a word character on either side.
                before = "\\ " if out and out[-1][-1:].isalnum() else ""
                after = "\\ " if text[j : j + 1].isalnum() else ""
                out.append(before + _INLINE[text[i]].format(body) + after)
                i = j
                continue
        out.append(text[i])
        i += 1
    return "".join(out)


def epytextToRest(lines: list) -> list:
    """Convert one docstring's lines."""
    result, fieldIndent = [], None
    for line in lines:
        field = _FIELD.match(line)
        indent = len(line) - len(line.lstrip())
        if field:
            indent, tag, name, text = field.groups()
            if fieldIndent is None and result and result[-1].strip():
                result.append("")  # a field list starts a new block
            fieldIndent = len(indent)
            tag = _FIELDS.get(tag, tag)
            head = f"{tag} {name.strip()}" if name else tag
            result.append(f"{indent}:{head}:{text}")
            continue
        if fieldIndent is not None and line.strip() and indent <= fieldIndent:
            result.append("")  # text after a field list
            fieldIndent = None
        result.append(line)
    # Inline markup last, over the whole text: it may span lines.
    return _inline("\n".join(result)).split("\n")


def processDocstring(app, what, name, obj, options, lines) -> None:
    """The ``autodoc-process-docstring`` handler: convert in place."""
    lines[:] = epytextToRest(lines)
