"""Find the program in a model's completion.

:func:`extract_code` returns the last fenced Python block of a markdown answer:

* a block opens with a line of three backticks, optionally followed by a language
  tag (```` ```python ````), and closes with a line of three backticks (or with
  three backticks ending a code line, ``print(x)```` ``, a common model slip);
* Python-tagged blocks (``python``, ``py``, ``python3``, ``py3``, any case) win;
  if there is none, the last untagged block is taken; blocks tagged with another
  language (``text``, ``bash``...) are never taken;
* a block left open at the end of the text (a completion cut at the token limit)
  runs to the end of the text;
* a new tagged opening fence inside an open block closes the open block;
* the block is dedented and stripped of blank lines around it; an empty block,
  or text without fences, gives None.
"""

from __future__ import annotations

import re
import textwrap

PYTHON_TAGS = frozenset({"python", "py", "python3", "py3"})

_OPEN = re.compile(r"^[ \t]*```[ \t]*([A-Za-z0-9_+#.-]*)[^`]*$")
_CLOSE = re.compile(r"^[ \t]*```+[ \t]*$")


def _blocks(text: str) -> list[tuple[str, list[str]]]:
    """All fenced blocks as ``(tag, lines)``, in order; an unclosed last block included."""
    blocks: list[tuple[str, list[str]]] = []
    tag: str | None = None  # None: outside a block
    lines: list[str] = []
    for line in text.splitlines():
        if tag is None:
            m = _OPEN.match(line)
            if m:
                tag, lines = m.group(1).lower(), []
            continue
        if _CLOSE.match(line):
            blocks.append((tag, lines))
            tag = None
            continue
        m = _OPEN.match(line)
        if m and m.group(1):  # "```python" inside a block: the model started a new one
            blocks.append((tag, lines))
            tag, lines = m.group(1).lower(), []
            continue
        stripped = line.rstrip()
        if stripped.endswith("```") and not stripped.lstrip().startswith("```"):
            lines.append(stripped[:-3])  # "print(x)```": code line and closing fence
            blocks.append((tag, lines))
            tag = None
            continue
        lines.append(line)
    if tag is not None:
        blocks.append((tag, lines))  # truncated completion: the block runs to the end
    return blocks


def extract_code(text: str) -> str | None:
    """The last fenced Python block of ``text`` (see the module docstring), or None."""
    if not text or "```" not in text:
        return None
    blocks = _blocks(text)
    python = [lines for tag, lines in blocks if tag in PYTHON_TAGS]
    bare = [lines for tag, lines in blocks if tag == ""]
    chosen = python[-1] if python else bare[-1] if bare else None
    if chosen is None:
        return None
    code = textwrap.dedent("\n".join(chosen)).strip("\n").rstrip()
    return code + "\n" if code.strip() else None
