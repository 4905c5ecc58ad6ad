"""The method registry: one `MethodRules` per config type, as torchao registers one handler per
config type (`register_quantize_module_handler`).

    @register(MyConfig)
    class MyRules(MethodRules): ...

`rules_for(config)` is how the quantizer, and anything else that must know what a config's
method does, asks; nothing dispatches on config types elsewhere.
"""

from __future__ import annotations

from typing import Any, Callable

from dgq.methods.base import MethodInputs, MethodRules, ProbQuant

_RULES: dict[type, MethodRules] = {}


def register(config_type: type) -> Callable[[type[MethodRules]], type[MethodRules]]:
    """Class decorator: the rules of `config_type`'s method (one per type)."""

    def deco(cls: type[MethodRules]) -> type[MethodRules]:
        if config_type in _RULES:
            raise ValueError(f"{config_type.__name__} already has rules ({type(_RULES[config_type]).__name__})")
        _RULES[config_type] = cls()
        return cls

    return deco


def rules_for(config: Any) -> MethodRules:
    """The rules of `config`'s method; a clear error for a config type nobody registered."""
    try:
        return _RULES[type(config)]
    except KeyError:
        known = ", ".join(sorted(t.__name__ for t in _RULES))
        raise TypeError(f"no quantization method is registered for {type(config).__name__}; known: {known}") from None


# the built-in methods register themselves on import
from dgq.methods import baseline, dgq_method, fp  # noqa: E402, F401

__all__ = ["MethodInputs", "MethodRules", "ProbQuant", "register", "rules_for"]
