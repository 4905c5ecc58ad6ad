"""Training captions: the template with or without its background, paraphrases, reproducibility."""

from __future__ import annotations

import random

import pytest

from dgq.tiny import captions as C
from dgq.tiny import render as R


def _scenes(n: int = 200):
    return [C.scene_of(s) for s in range(n)]


def test_scene_of_is_the_rendered_scene():
    for s in range(50):
        assert C.scene_of(s) == R.sample(s)[0]


def test_template_keeps_the_facts_with_or_without_background():
    for s, scene in enumerate(_scenes()):
        named = C.template(scene, random.Random(s), name_background=True)
        bare = C.template(scene, random.Random(s), name_background=False)
        assert named.endswith(f" on a {scene.background} background")
        assert "background" not in bare
        parsed = R.parse_caption(named)
        assert parsed.background == scene.background
        assert [(o.color, o.shape) for o in parsed.objects] == [(o.color, o.shape) for o in scene.objects]


def test_paraphrase_uses_words_the_template_never_writes():
    template_words = set()
    for s, scene in enumerate(_scenes(2000)):
        template_words |= set(R.caption(scene, random.Random(s)).split())
    new = set()
    for s, scene in enumerate(_scenes(500)):
        new |= set(C.paraphrase(scene, random.Random(s)).split()) - template_words
    for word in ("big", "tiny", "grey", "upper", "violet", "rhombus", "backdrop"):
        assert word in new


def test_paraphrase_names_colours_and_shapes_of_the_scene():
    for s, scene in enumerate(_scenes()):
        text = C.paraphrase(scene, random.Random(s))
        for o in scene.objects:
            assert any(c in text for c in C._COLOR[o.color])
            assert any(w in text for w in C._SHAPE[o.shape])


def test_training_caption_probabilities_and_reproducibility():
    scenes = _scenes(400)
    none = [C.training_caption(sc, random.Random(i), 0.5, 0.0) for i, sc in enumerate(scenes)]
    assert not any("background" in c or "backdrop" in c or " on grey" in c for c in none)
    a = [C.training_caption(sc, random.Random(i), 0.5, 0.5) for i, sc in enumerate(scenes)]
    b = [C.training_caption(sc, random.Random(i), 0.5, 0.5) for i, sc in enumerate(scenes)]
    assert a == b
    with pytest.raises(ValueError, match="probabilities"):
        C.training_caption(scenes[0], random.Random(0), 1.5, 0.5)


def test_paraphrased_prompts_pair_with_template_captions():
    para, tmpl = C.paraphrased_prompts(90_000_000, 20)
    assert len(para) == len(tmpl) == 20
    assert para != tmpl
    for p, t in zip(para, tmpl):
        R.parse_caption(t)  # scoring side stays in the evaluator's grammar
