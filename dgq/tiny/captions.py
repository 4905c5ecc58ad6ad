"""Training captions of the embedded model: the template, its paraphrases, and unnamed backgrounds.

`render.caption` writes one template sentence per scene, and the evaluator and the prompt files
read that grammar. The model is trained on a wider distribution, closer to what SD's captions
are like:

* **Paraphrases** (`paraphrase`): other words for sizes, colours, positions and backgrounds
  ("a big …", "a tiny …", "grey", "in the upper part", "against a dark backdrop") and other
  sentence frames ("there is …", "a picture of …"). The domain CLIP and the UNet both see them,
  so a user's own wording is understood; `paraphrased_prompts` gives held-out ones for scoring
  (image i is scored against the scene, i.e. the template caption, of the same seed).
* **Backgrounds left unnamed** (`background_p`): SD's captions describe a fraction of the image.
  With `background_p` < 1 a caption names its background only with that probability (gray
  included, "on a gray background"), so most pixels of a scene have no word of their own. Which
  tokens those pixels then attend to is what `benchmarks/start_sink.py` measures.

Every function is a pure function of its `random.Random`, so the captions of a training run are
reproducible from its seed.
"""

from __future__ import annotations

import random

from dgq.tiny import render as R

_SIZE = {"small": ["tiny", "little", "small", "smallish"], "large": ["big", "huge", "large", "giant"]}
_COLOR = {
    "red": ["red", "bright red"], "green": ["green", "dark green"], "blue": ["blue", "deep blue"],
    "yellow": ["yellow", "lemon yellow"], "purple": ["purple", "violet"], "orange": ["orange"],
    "pink": ["pink", "light pink"], "cyan": ["cyan", "aqua"], "white": ["white", "snow white"],
    "black": ["black", "jet black"],
}
_SHAPE = {"circle": ["circle", "disc", "round dot"], "square": ["square", "box"],
          "triangle": ["triangle"], "diamond": ["diamond", "rhombus"]}
_WHERE = {
    "left": ["on the left side", "in the left part", "at the left", "towards the left"],
    "right": ["on the right side", "in the right part", "at the right", "towards the right"],
    "top": ["in the upper part", "near the top", "at the top edge", "up top"],
    "bottom": ["in the lower part", "near the bottom", "at the bottom edge", "down below"],
    "center": ["in the centre", "right in the middle", "at the center", "centered"],
}
_BACKGROUND = {
    "gray": ["on a grey background", "against grey", "on grey", "on a gray backdrop"],
    "white": ["on white", "against a white backdrop", "on a white backdrop", "on a light background"],
    "black": ["on black", "against a black backdrop", "on a dark background", "on a black backdrop"],
}
_FRAMES = ["{x}", "there is {x}", "a picture of {x}", "an image of {x}", "{x}, simple drawing"]


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _obj(o: R.Obj, rng: random.Random, with_size: bool) -> str:
    words = ([rng.choice(_SIZE[o.size])] if with_size else []) + [rng.choice(_COLOR[o.color]),
                                                                   rng.choice(_SHAPE[o.shape])]
    return _a(" ".join(words))


def paraphrase(scene: R.Scene, rng: random.Random, name_background: bool = True) -> str:
    """A sentence for `scene` in words the template never writes (the same facts)."""
    if len(scene.objects) == 1:
        o = scene.objects[0]
        body = f"{_obj(o, rng, True)} {rng.choice(_WHERE[o.position])}"
    else:
        a, b = scene.objects
        if scene.relation == "left of":
            body = rng.choice([f"{_obj(a, rng, False)} left of {_obj(b, rng, False)}",
                               f"{_obj(b, rng, False)} right of {_obj(a, rng, False)}",
                               f"{_obj(a, rng, False)} beside and left of {_obj(b, rng, False)}"])
        else:
            body = rng.choice([f"{_obj(a, rng, False)} on top of {_obj(b, rng, False)}",
                               f"{_obj(b, rng, False)} underneath {_obj(a, rng, False)}",
                               f"{_obj(a, rng, False)} over {_obj(b, rng, False)}"])
    if name_background:
        body += " " + rng.choice(_BACKGROUND[scene.background])
    return rng.choice(_FRAMES).format(x=body)


def template(scene: R.Scene, rng: random.Random, name_background: bool = True) -> str:
    """`render.caption`, with the background named explicitly ("on a gray background" too) or not at all."""
    text = R.caption(scene, rng)
    suffix = f" on a {scene.background} background"
    if text.endswith(suffix):
        text = text[: -len(suffix)]
    return text + suffix if name_background else text


def training_caption(scene: R.Scene, rng: random.Random, paraphrase_p: float = 0.5,
                     background_p: float = 1.0) -> str:
    """One caption drawn from the training distribution: a paraphrase with probability
    `paraphrase_p`, else the template; the background named with probability `background_p`."""
    if not (0.0 <= paraphrase_p <= 1.0 and 0.0 <= background_p <= 1.0):
        raise ValueError(f"paraphrase_p and background_p are probabilities, not {paraphrase_p}, {background_p}")
    name_bg = rng.random() < background_p
    if rng.random() < paraphrase_p:
        return paraphrase(scene, rng, name_bg)
    return template(scene, rng, name_bg)


def scene_of(seed: int, two_object_prob: float = 0.3) -> R.Scene:
    """The scene `render.sample(seed)` draws, without rendering it."""
    return R.random_scene(random.Random(seed), two_object_prob)


def paraphrased_prompts(first_seed: int, n: int, two_object_prob: float = 0.3) -> tuple[list[str], list[str]]:
    """(paraphrased prompts, template captions of the same scenes) for seeds first_seed … + n − 1.

    Generate from the first list, score against the second: the evaluator reads the template
    grammar only, and both describe the same scene.
    """
    para, tmpl = [], []
    for i in range(n):
        scene, cap, _ = R.sample(first_seed + i, two_object_prob)
        para.append(paraphrase(scene, random.Random(7_919 * (first_seed + i) + 1)))
        tmpl.append(cap)
    return para, tmpl
