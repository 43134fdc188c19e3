"""Bytes of exported files: JSON, .npy, and scripts rendered from templates with every value quoted.

Plans are shared artefacts, so a plan string must never become code in a launch script or a Python
file. Templates write a value only through a quoting filter: `sh` (shell word, shlex.quote), `py`
(Python literal, repr), `json` (JSON/YAML flow value) or `comment` (text for a comment line, control
characters escaped so a value cannot end the line). Rendering fails on a string that went through
none of them (`_finalize`), so a template cannot forget; integers may be written as they are.
"""

from __future__ import annotations

import io
import json
import shlex
from typing import Any

import jinja2
import numpy as np


class Quoted(str):
    """Text a quoting filter produced: safe to write where that filter's language is read."""


def sh(value: object) -> Quoted:
    """One shell word: the value verbatim whatever it holds."""
    return Quoted(shlex.quote(str(value)))


def py(value: object) -> Quoted:
    """A Python literal of a str, int or list of them."""
    if not isinstance(value, (str, int, list, tuple)) or isinstance(value, bool):
        raise TypeError(f"py filter: {type(value).__name__} is not a str, int or list")
    return Quoted(repr(value))


def json_value(value: object) -> Quoted:
    """A JSON value (also a YAML flow value)."""
    return Quoted(json.dumps(value))


def comment(value: object) -> Quoted:
    """Text for inside a comment: non-printable characters (newlines, CR, ...) as escapes."""
    return Quoted("".join(c if c.isprintable() else repr(c)[1:-1] for c in str(value)))


def _finalize(value: Any) -> Any:
    if isinstance(value, Quoted) or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise TypeError(f"template writes {type(value).__name__} {str(value)[:40]!r} unquoted; "
                    "pass it through sh, py, json or comment")


_ENV: jinja2.Environment | None = None


def environment() -> jinja2.Environment:
    """The template environment: planner/export/templates, the quoting filters, unquoted strings refused."""
    global _ENV
    if _ENV is None:
        _ENV = jinja2.Environment(loader=jinja2.PackageLoader("planner.export", "templates"), autoescape=False,
                                  keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True,
                                  undefined=jinja2.StrictUndefined, finalize=_finalize,
                                  # shell's ${#array[@]} must reach the scripts: no "{#" comments
                                  comment_start_string="{##", comment_end_string="##}")
        _ENV.filters.update(sh=sh, py=py, json=json_value, comment=comment)
    return _ENV


def render(template: str, ctx: dict) -> bytes:
    """Render planner/export/templates/`template` with `ctx`."""
    return environment().get_template(template).render(**ctx).encode()


def json_bytes(obj: object, indent: bool = False) -> bytes:
    if indent:
        return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()
    return (json.dumps(obj, separators=(",", ":"), sort_keys=True) + "\n").encode()


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr, dtype=np.int64), allow_pickle=False)
    return buf.getvalue()
