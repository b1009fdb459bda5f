"""The jinja2 environment for the scripts that tdx-rules writes.

Templates live in ``tdx_rules/templates``. Rendering is strict: an undefined
variable is an error, nothing is HTML-escaped, and the trailing newline of a
template is kept. Every value that comes from the user reaches a template
through the ``sh`` filter, which turns it into exactly one shell word
(:func:`shlex.quote`), so no configuration value is ever read as shell code.
"""

import functools
import os
import shlex

import jinja2

from .errors import TdxError

TEMPLATE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")


def check_text(what: str, value, multiline: bool = True) -> str:
    """``value`` as text that can reach a program: no NUL, valid Unicode, one line unless ``multiline``."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise TdxError(f"{what}: expected a string, got {value!r}")
    text = str(value)
    if "\0" in text:
        raise TdxError(f"{what}: {text!r} contains a NUL byte, which cannot be passed to a program: remove it")
    if not multiline and ("\n" in text or "\r" in text):
        raise TdxError(f"{what}: {text!r} contains a line break: use a single line")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise TdxError(f"{what}: {text!r} is not valid Unicode text: fix its encoding") from None
    return text


def sh_quote(value) -> str:
    """One POSIX shell word whose value is ``value`` (a string or an int)."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise TypeError(f"the sh filter quotes strings and integers, not {value!r}")
    text = str(value)
    if "\0" in text:
        raise TdxError(f"value {text!r} contains a NUL byte, which no shell word can carry: remove it")
    return shlex.quote(text)


@functools.lru_cache(maxsize=None)
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["sh"] = sh_quote
    return env


def render(template: str, **context) -> str:
    """Render ``template`` (a file name in the templates directory) with ``context``."""
    return environment().get_template(template).render(**context)


def static(name: str) -> bytes:
    """The bytes of a template file that is shipped as is (no rendering)."""
    with open(os.path.join(TEMPLATE_DIR, name), "rb") as handle:
        return handle.read()
