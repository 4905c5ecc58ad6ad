"""The synthetic captioned-shapes domain the embedded model is trained on.

A scene is a small frozen dataclass (one or two objects, a background); `render` draws it
deterministically and `caption` writes a template sentence for it. Everything is a pure
function of a seed, so the training set, the evaluator's test set and the evaluation prompts are
reproducible without storing any images.

Colours are CSS named-colour values. Objects never take their background's colour.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
_SUPERSAMPLE = 4

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 128, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "purple": (128, 0, 128),
    "orange": (255, 165, 0),
    "pink": (255, 192, 203),
    "cyan": (0, 255, 255),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
RELATIONS = ("left of", "above")

# Object centre (fraction of the image) for each named position.
_POS_XY = {
    "left": (0.26, 0.5),
    "right": (0.74, 0.5),
    "top": (0.5, 0.26),
    "bottom": (0.5, 0.74),
    "center": (0.5, 0.5),
}
_RADIUS = {"small": 7.0, "large": 13.0, "pair": 10.0}  # half-extent in pixels at 64 px


@dataclass(frozen=True)
class Obj:
    """One filled shape."""

    color: str
    shape: str
    size: str = "small"
    position: str = "center"


@dataclass(frozen=True)
class Scene:
    """One object, or two with a relation; `objects[0]` is the left/top one of a pair."""

    objects: tuple[Obj, ...]
    background: str = "gray"
    relation: str | None = None  # "left of" | "above" for pairs
    jitter: tuple[float, float, float] = field(default=(0.0, 0.0, 0.0))

    def __post_init__(self) -> None:
        if not 1 <= len(self.objects) <= 2:
            raise ValueError(f"a scene has one or two objects, got {len(self.objects)}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}; allowed: {list(BACKGROUNDS)}")
        for o in self.objects:
            if o.color not in COLORS or o.shape not in SHAPES:
                raise ValueError(f"unknown object {o}")
            if o.color == self.background:
                raise ValueError(f"a {o.color} object on a {o.color} background is invisible")
        if len(self.objects) == 2 and self.relation not in RELATIONS:
            raise ValueError(f"a pair needs a relation in {RELATIONS}, got {self.relation!r}")


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        r *= 0.88  # equal visual area with the circle
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":  # apex up
        return [(cx, cy - r * 1.1), (cx + r * 1.1, cy + r * 0.9), (cx - r * 1.1, cy + r * 0.9)]
    if shape == "diamond":
        r *= 1.15
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    return None


def _centres(scene: Scene) -> list[tuple[float, float, float]]:
    """(cx, cy, radius) in pixels for each object, jitter applied."""
    jx, jy, js = scene.jitter
    out = []
    if len(scene.objects) == 1:
        o = scene.objects[0]
        fx, fy = _POS_XY[o.position]
        r = _RADIUS[o.size] * (1.0 + 0.1 * js)
        out.append((fx * IMAGE_SIZE + 2.5 * jx, fy * IMAGE_SIZE + 2.5 * jy, r))
    else:
        r = _RADIUS["pair"] * (1.0 + 0.1 * js)
        pos = [(0.27, 0.5), (0.73, 0.5)] if scene.relation == "left of" else [(0.5, 0.27), (0.5, 0.73)]
        for fx, fy in pos:
            out.append((fx * IMAGE_SIZE + 2.0 * jx, fy * IMAGE_SIZE + 2.0 * jy, r))
    return out


def render(scene: Scene) -> Image.Image:
    """Draw `scene` as a 64×64 RGB image (antialiased by 4× supersampling; deterministic)."""
    s = _SUPERSAMPLE
    img = Image.new("RGB", (IMAGE_SIZE * s, IMAGE_SIZE * s), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for obj, (cx, cy, r) in zip(scene.objects, _centres(scene)):
        fill = COLORS[obj.color]
        poly = _shape_polygon(obj.shape, cx * s, cy * s, r * s)
        if poly is None:
            draw.ellipse([cx * s - r * s, cy * s - r * s, cx * s + r * s, cy * s + r * s], fill=fill)
        else:
            draw.polygon(poly, fill=fill)
    return img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def caption(scene: Scene, rng: random.Random | None = None) -> str:
    """A template caption for `scene`; `rng` picks among equivalent phrasings."""
    rng = rng or random.Random(0)
    bg = "" if scene.background == "gray" else f" on a {scene.background} background"
    if len(scene.objects) == 1:
        o = scene.objects[0]
        where = {
            "left": ["on the left", "in the left"],
            "right": ["on the right", "in the right"],
            "top": ["at the top", "in the top"],
            "bottom": ["at the bottom", "in the bottom"],
            "center": ["in the center", "in the middle"],
        }[o.position]
        return f"a {o.size} {o.color} {o.shape} {rng.choice(where)}{bg}"
    a, b = scene.objects
    if scene.relation == "left of":
        if rng.random() < 0.5:
            return f"a {a.color} {a.shape} to the left of a {b.color} {b.shape}{bg}"
        return f"a {b.color} {b.shape} to the right of a {a.color} {a.shape}{bg}"
    if rng.random() < 0.5:
        return f"a {a.color} {a.shape} above a {b.color} {b.shape}{bg}"
    return f"a {b.color} {b.shape} below a {a.color} {a.shape}{bg}"


def random_scene(rng: random.Random, two_object_prob: float = 0.3) -> Scene:
    """Sample a scene: background gray 60 % of the time, objects never on their own colour."""
    background = "gray" if rng.random() < 0.6 else rng.choice(["white", "black"])
    colors = [c for c in COLORS if c != background]
    jitter = (rng.uniform(-1, 1), rng.uniform(-1, 1), rng.uniform(-1, 1))
    if rng.random() < two_object_prob:
        ca, cb = rng.sample(colors, 2)
        objs = (Obj(ca, rng.choice(SHAPES)), Obj(cb, rng.choice(SHAPES)))
        return Scene(objs, background, rng.choice(RELATIONS), jitter)
    obj = Obj(rng.choice(colors), rng.choice(SHAPES), rng.choice(SIZES), rng.choice(POSITIONS))
    return Scene((obj,), background, None, jitter)


def sample(seed: int, two_object_prob: float = 0.3) -> tuple[Scene, str, Image.Image]:
    """(scene, caption, image) for one seed — the unit of every data set in this project."""
    rng = random.Random(seed)
    scene = random_scene(rng, two_object_prob)
    return scene, caption(scene, rng), render(scene)


def to_array(img: Image.Image) -> np.ndarray:
    """uint8 HWC array."""
    return np.asarray(img, dtype=np.uint8)


def parse_caption(text: str) -> Scene:
    """Inverse of `caption` for the template grammar (used to score generated images).

    Raises ValueError for text outside the grammar, so an evaluation never guesses what a free-form
    prompt asked for.
    """
    words = text.strip().lower().rstrip(".").split()
    background = "gray"
    if len(words) >= 4 and words[-1] == "background" and words[-4] == "on":
        background = words[-2]
        words = words[:-4]
    s = " ".join(words)
    for rel, flip, phrase in (
        ("left of", False, " to the left of "),
        ("left of", True, " to the right of "),
        ("above", False, " above "),
        ("above", True, " below "),
    ):
        if phrase in s:
            left, right = s.split(phrase)
            a, b = _parse_obj(left), _parse_obj(right)
            if flip:
                a, b = b, a
            return Scene((a, b), background, rel)
    parts = s.split()
    if len(parts) < 5 or parts[0] != "a":
        raise ValueError(f"not a caption of the shapes domain: {text!r}")
    size, color, shape = parts[1], parts[2], parts[3]
    where = " ".join(parts[4:])
    position = {
        "on the left": "left", "in the left": "left", "on the right": "right", "in the right": "right",
        "at the top": "top", "in the top": "top", "at the bottom": "bottom", "in the bottom": "bottom",
        "in the center": "center", "in the middle": "center",
    }.get(where)
    if size not in SIZES or position is None:
        raise ValueError(f"not a caption of the shapes domain: {text!r}")
    return Scene((Obj(color, shape, size, position),), background)


def _parse_obj(text: str) -> Obj:
    parts = text.split()
    if len(parts) != 3 or parts[0] != "a":
        raise ValueError(f"cannot parse object {text!r}")
    return Obj(parts[1], parts[2])


def render_batch(seeds: list[int]):
    """Renders of `seeds` as a [-1, 1] float tensor [N, 3, 64, 64] and their captions."""
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415 - the renderer itself needs neither

    arrs, caps = [], []
    for s in seeds:
        _, cap, img = sample(s)
        arrs.append(to_array(img))
        caps.append(cap)
    x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x, caps
