"""Strict input checks at the app's boundary: the UI, the named API and raw HTTP all pass here.

Why: Gradio's own components coerce (a Number with ``precision=0`` turns seed 1.5 into 2, a
Dropdown with custom values passes ``123`` on) or fail with messages that do not say which input
was wrong ("Value 51 is greater than maximum value 50.", or nothing at all when a string reaches a
number comparison). Every check here names the parameter, what is wrong with the value and what
is allowed, and never replaces a value by another one. The `Strict*` components run the same
checks in their `preprocess`, before any callback; the callbacks check again, so that calling
them directly (tests, cached examples) is held to the same rules.
"""

from __future__ import annotations

import math
import unicodedata
from typing import Any, Callable

import gradio as gr
import numpy as np

# Unicode categories that count as visible content in a prompt (letters, marks, numbers,
# punctuation, symbols): a prompt of only spaces, zero-width or control characters is empty.
_VISIBLE = ("L", "M", "N", "P", "S")
_ALLOWED_CONTROLS = {"\n", "\t", "\r"}
MAX_MODEL_CHARS = 300


def input_error(name: str, problem: str, allowed: str) -> gr.Error:
    """The one shape of every input error: parameter, what is wrong, what is allowed."""
    return gr.Error(f"{name}: {problem}; allowed: {allowed}", print_exception=False)


def _show(value: Any, limit: int = 40) -> str:
    """A short, safe rendering of a bad value for a message."""
    s = repr(value)
    s = s.encode("ascii", "backslashreplace").decode("ascii")
    return s if len(s) <= limit else s[: limit - 1] + "…"


def as_int(name: str, value: Any, lo: int, hi: int) -> int:
    """An integer in lo..hi. Integral floats (4.0, what JSON numbers may arrive as) are taken as
    the same integer; 1.5, "4", True, None and NaN are refused."""
    allowed = f"integers {lo}..{hi}"
    if isinstance(value, (bool, np.bool_)) or value is None or not isinstance(value, (int, float, np.integer, np.floating)):
        raise input_error(name, f"{_show(value)} is not an integer", allowed)
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value) or value != int(value):
            raise input_error(name, f"{_show(value)} is not an integer", allowed)
    v = int(value)
    if not lo <= v <= hi:
        raise input_error(name, f"{v} is out of range", allowed)
    return v


def as_float(name: str, value: Any, lo: float, hi: float) -> float:
    """A finite number in lo..hi (ints accepted; strings, booleans and NaN refused)."""
    allowed = f"numbers {lo:g}..{hi:g}"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise input_error(name, f"{_show(value)} is not a number", allowed)
    f = float(value)
    if not math.isfinite(f):
        raise input_error(name, f"{_show(value)} is not a finite number", allowed)
    if not lo <= f <= hi:
        raise input_error(name, f"{f:g} is out of range", allowed)
    return f


def as_bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise input_error(name, f"{_show(value)} is not a boolean", "true or false")
    return bool(value)


def as_choice(name: str, value: Any, allowed: list) -> Any:
    """One of `allowed`, of the same type (16 is a choice of [1, 2, 16]; "16" and True are not)."""
    ok = any(type(value) is type(a) and value == a for a in allowed) or (
        isinstance(value, np.integer) and int(value) in allowed)
    if not ok:
        raise input_error(name, f"{_show(value)} is not one of the choices", ", ".join(map(repr, allowed)))
    return int(value) if isinstance(value, np.integer) else value


def as_text(name: str, value: Any, max_chars: int) -> str:
    """Text with visible content: refuses non-strings, lone surrogates (not encodable), control
    characters and prompts of only spaces or zero-width characters."""
    allowed = f"text of 1..{max_chars} characters with visible content"
    if not isinstance(value, str):
        raise input_error(name, f"{_show(value)} ({type(value).__name__}) is not text", allowed)
    if len(value) > max_chars:
        raise input_error(name, f"{len(value)} characters is too long", allowed)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise input_error(name, "the text holds an unpaired surrogate (invalid Unicode)", allowed) from None
    bad = next((c for c in value if unicodedata.category(c) == "Cc" and c not in _ALLOWED_CONTROLS), None)
    if bad is not None:
        raise input_error(name, f"the text holds the control character U+{ord(bad):04X}", allowed)
    if not any(unicodedata.category(c)[0] in _VISIBLE for c in value):
        raise input_error(name, "the prompt is empty (no visible characters)", allowed)
    return value


def as_model_name(value: Any) -> str:
    """The model field's type check; which models are served is `app.models.ModelPolicy`'s."""
    allowed = "a model name offered by this server (empty = the server's default)"
    if not isinstance(value, str):
        raise input_error("model", f"{_show(value)} ({type(value).__name__}) is not a model name", allowed)
    if len(value) > MAX_MODEL_CHARS:
        raise input_error("model", f"{len(value)} characters is too long", allowed)
    if value:
        as_text("model", value, MAX_MODEL_CHARS)
    return value


# ----------------------------------------------------------------------------- components
class _Strict:
    """Mixin: `preprocess` runs the bound check instead of the component's coercing one.

    The subclasses define no `__init__`: Gradio builds a component's config (and the API's
    parameter defaults) from its class's `__init__` signature, which they inherit unchanged."""

    _check: Callable[[Any], Any]

    def preprocess(self, payload: Any) -> Any:  # type: ignore[override]
        return self._check(payload)

    def get_block_name(self) -> str:
        """The Gradio component this one extends: its front end renders this one unchanged."""
        return next(c for c in type(self).__mro__[1:] if c.__module__.startswith("gradio.")).__name__.lower()

    get_block_class = get_block_name


class StrictNumber(_Strict, gr.Number):
    pass


class StrictSlider(_Strict, gr.Slider):
    pass


class StrictRadio(_Strict, gr.Radio):
    pass


class StrictCheckbox(_Strict, gr.Checkbox):
    pass


class StrictTextbox(_Strict, gr.Textbox):
    pass


class StrictDropdown(_Strict, gr.Dropdown):
    pass


def _bind(component: Any, check: Callable[[Any], Any]) -> Any:
    component._check = check
    return component


def int_number(param: str, lo: int, hi: int, **kw: Any) -> StrictNumber:
    return _bind(StrictNumber(minimum=lo, maximum=hi, precision=0, **kw), lambda v: as_int(param, v, lo, hi))


def int_slider(param: str, lo: int, hi: int, **kw: Any) -> StrictSlider:
    return _bind(StrictSlider(lo, hi, step=1, precision=0, **kw), lambda v: as_int(param, v, lo, hi))


def float_slider(param: str, lo: float, hi: float, **kw: Any) -> StrictSlider:
    return _bind(StrictSlider(lo, hi, **kw), lambda v: as_float(param, v, lo, hi))


def radio(param: str, choices: list, **kw: Any) -> StrictRadio:
    values = [c[1] if isinstance(c, tuple) else c for c in choices]
    return _bind(StrictRadio(choices, **kw), lambda v: as_choice(param, v, values))


def checkbox(param: str, value: bool, **kw: Any) -> StrictCheckbox:
    return _bind(StrictCheckbox(value, **kw), lambda v: as_bool(param, v))


def textbox(param: str, max_chars: int, **kw: Any) -> StrictTextbox:
    return _bind(StrictTextbox(**kw), lambda v: as_text(param, v, max_chars))


def model_dropdown(choices: list[str], **kw: Any) -> StrictDropdown:
    return _bind(StrictDropdown(choices, allow_custom_value=True, **kw), as_model_name)
