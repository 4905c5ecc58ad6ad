"""Which models the app serves: the embedded one, a configured list of Hub ids, and local folders
only when the operator enables them.

Why: the `model` input reaches the loader, so on a public Space an unrestricted field would load
(and calibrate) any folder of the server, unpickle its weights, and its error messages would tell
a visitor which paths exist. The policy decides before anything touches the file system, gives
one canonical name per model (so `…/tiny-sd` and `…/../assets/tiny-sd` are one model, calibrated
once) and words every refusal without server paths.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import dgq

from app.inputs import as_model_name, input_error

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class ModelPolicy:
    """The models a server offers.

    Args:
        default: the operator's default model (always served; may be a local folder).
        hub_ids: Hub ids (or library aliases such as "sd-v1-4") users may ask for.
        allow_local: whether users may name local diffusers folders (`DGQ_APP_ALLOW_LOCAL=1`).
    """

    default: str
    hub_ids: tuple[str, ...]
    allow_local: bool = False

    def choices(self) -> list[str]:
        """What the Model dropdown lists (the default first)."""
        return list(dict.fromkeys([self.display(self.canonical_default()), "tiny", *self.hub_ids]))

    def canonical_default(self) -> str:
        return dgq.canonical_model(self.default)

    def allowed(self) -> str:
        names = ", ".join(self.choices())
        return names + (" or a local diffusers folder" if self.allow_local else "")

    def resolve(self, value: object) -> str:
        """The canonical name of the model `value` asks for, or a `gr.Error` naming the parameter.

        "" is the server's default; a refused name gets the same message whether or not a folder
        of that name exists on the server."""
        name = as_model_name(value)
        if name == "":
            return self.canonical_default()
        if name == self.default or name == self.display(self.canonical_default()):
            return self.canonical_default()
        if name == "tiny":
            return "tiny"
        if name in self.hub_ids:
            return dgq.canonical_model(name)
        if self.allow_local and not _HUB_ID.match(name):
            path = Path(name).expanduser()
            if path.is_absolute() and (path / "model_index.json").is_file():
                return dgq.canonical_model(str(path))
            raise input_error("model", f"{name!r} is not a diffusers pipeline folder this server can load",
                              "an absolute path to a folder with model_index.json and safetensors weights, or "
                              + ", ".join(self.choices()))
        hint = "" if self.allow_local else " (local folders are disabled on this server)"
        raise input_error("model", f"{name[:80]!r} is not offered by this server{hint}", self.allowed())

    def display(self, canonical: str) -> str:
        """How a model is named back to a user: ids as they are, a local folder by its last part only."""
        if canonical == "tiny" or not canonical.startswith("/"):
            return canonical
        return Path(canonical).name
