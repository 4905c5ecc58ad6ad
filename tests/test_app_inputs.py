"""The app's input boundary (`app.inputs`, `app.models`): every bad input of each category gets a
message naming the parameter, what is wrong and what is allowed, and no value is silently replaced.
No model is loaded here (a second or two)."""

from __future__ import annotations

import os
import re

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
gr = pytest.importorskip("gradio")

from app import constants as C  # noqa: E402
from app.callbacks import make_configs, make_request  # noqa: E402
from app.models import ModelPolicy  # noqa: E402

POLICY = ModelPolicy("tiny", (C.SD14,))


def _message(fn, *args, **kwargs) -> str:
    """The message of the `gr.Error` that `fn` raises (what the user reads)."""
    with pytest.raises(gr.Error) as e:
        fn(*args, **kwargs)
    return e.value.message
GOOD = dict(prompt="a red circle", seed=1, steps=4, guidance=7.5, model="")
QUANT = dict(w_bits=8, a_bits=6, groups=16, baseline="tfmq")


@pytest.mark.parametrize("kw, match", [
    # wrong types: named, never coerced
    (dict(seed="abc"), r"^seed: 'abc' is not an integer; allowed: integers 0\.\.4294967295$"),
    (dict(seed=1.5), r"^seed: 1\.5 is not an integer"),
    (dict(seed=float("nan")), r"^seed: nan is not an integer"),
    (dict(seed=True), r"^seed: True is not an integer"),
    (dict(seed=None), r"^seed: None is not an integer"),
    (dict(steps=None), r"^steps: None is not an integer"),
    (dict(steps=1.5), r"^steps: 1\.5 is not an integer"),
    (dict(steps="4"), r"^steps: '4' is not an integer"),
    (dict(guidance="7.5"), r"^guidance: '7\.5' is not a number"),
    (dict(guidance=float("inf")), r"^guidance: inf is not a finite number"),
    # ranges name the parameter
    (dict(steps=C.MAX_STEPS + 1), rf"^steps: {C.MAX_STEPS + 1} is out of range; allowed: integers 1\.\.{C.MAX_STEPS}$"),
    (dict(seed=-1), r"^seed: -1 is out of range"),
    (dict(guidance=21.0), r"^guidance: 21 is out of range; allowed: numbers 0\.\.20$"),
    # prompts: text with visible content only
    (dict(prompt=123), r"^prompt: 123 \(int\) is not text"),
    (dict(prompt=["a", "b"]), r"^prompt: \['a', 'b'\] \(list\) is not text"),
    (dict(prompt="   "), r"^prompt: the prompt is empty"),
    (dict(prompt="\u200b\u200d\ufeff"), r"^prompt: the prompt is empty \(no visible characters\)"),
    (dict(prompt="a red \ud800 circle"), r"^prompt: the text holds an unpaired surrogate"),
    (dict(prompt="a red\x00 circle"), r"^prompt: the text holds the control character U\+0000"),
    (dict(prompt="x" * (C.MAX_PROMPT_CHARS + 1)), rf"^prompt: {C.MAX_PROMPT_CHARS + 1} characters is too long"),
    # models: never replaced by the default, never looked up on disk by default
    (dict(model=123), r"^model: 123 \(int\) is not a model name"),
    (dict(model=["tiny"]), r"^model: \['tiny'\] \(list\) is not a model name"),
    (dict(model=True), r"^model: True \(bool\) is not a model name"),
    (dict(model="m" * 10_000), r"^model: 10000 characters is too long"),
    (dict(model="/etc"), r"^model: '/etc' is not offered by this server \(local folders are disabled"),
    (dict(model="~/.ssh"), r"^model: '~/.ssh' is not offered by this server"),
    (dict(model="someone/other-model"), r"^model: 'someone/other-model' is not offered"),
])
def test_bad_request_inputs_name_the_parameter(kw, match):
    args = dict(GOOD, **kw)
    msg = _message(make_request, args["prompt"], args["seed"], args["steps"], args["guidance"], args["model"], POLICY)
    assert re.search(match, msg), msg


@pytest.mark.parametrize("kw, match", [
    (dict(w_bits="4"), r"^w_bits: '4' is not an integer"),
    (dict(w_bits=2.5), r"^w_bits: 2\.5 is not an integer"),
    (dict(a_bits=4.5), r"^a_bits: 4\.5 is not an integer"),
    (dict(w_bits=9), r"^w_bits: 9 is out of range; allowed: integers 2\.\.8$"),
    (dict(groups=3), r"^groups: 3 is not one of the choices; allowed: 1, 2, 4, 8, 16$"),
    (dict(groups="16"), r"^groups: '16' is not one of the choices"),
    (dict(groups=True), r"^groups: True is not one of the choices"),
    (dict(baseline="gptq"), r"^baseline: 'gptq' is not one of the choices; allowed: 'tfmq', 'qdiff', 'tfmq-paper', "
                            r"'qdiff-paper'$"),
    (dict(baseline="qdiff-paper", execution="int8", a_bits=8), r"^execution: Q-Diffusion, paper recipe .* run simulated"),
    (dict(axis=None), r"^axis: None is not one of the choices"),
    (dict(log_quant="yes"), r"^log_quant: 'yes' is not a boolean; allowed: true or false$"),
    (dict(time_aware=1), r"^time_aware: 1 is not a boolean"),
    (dict(execution="fp16"), r"^execution: 'fp16' is not one of the choices; allowed: 'simulated', 'int8'$"),
    (dict(execution="int8"), r"^execution: int8 runs integer GEMMs on 8-bit activations, not a_bits=6"),
    (dict(execution="int8", a_bits=8, weight_rounding="adaround"), r"^execution: int8 packs round-to-nearest"),
    (dict(weight_rounding="learned"), r"^weight_rounding: 'learned' is not one of the choices"),
])
def test_bad_quantization_inputs_name_the_parameter(kw, match):
    msg = _message(make_configs, **dict(QUANT, **kw))
    assert re.search(match, msg), msg


def test_good_inputs_pass_unchanged():
    req = make_request("a red circle", 4.0, 25, 7, "", POLICY)
    assert (req.seed, req.steps, req.guidance, req.model) == (4, 25, 7.0, "tiny")
    assert type(req.seed) is int and type(req.guidance) is float
    assert make_request("a red circle", 0, 1, 0.0, C.SD14, POLICY).model == C.SD14
    base, dq = make_configs(4, 6, 8, "qdiff", True, "pixel", False, True, True, False)
    assert base.label() == "Q-Diffusion W4A6" and dq.label().startswith("DGQ W4A6 K=8 axis=pixel")


def test_components_check_before_any_callback():
    """The components' preprocess (what the API and raw HTTP reach first) runs the same checks."""
    from app.inputs import checkbox, float_slider, int_number, int_slider, model_dropdown, radio, textbox

    cases = [
        (int_number("seed", 0, 10, value=0), 1.5, "seed: 1.5 is not an integer"),
        (int_slider("steps", 1, 50, value=25), 51, "steps: 51 is out of range; allowed: integers 1..50"),
        (float_slider("guidance", 0.0, 20.0, value=7.5), "x", "guidance: 'x' is not a number"),
        (radio("groups", [1, 2, 16], value=16), "16", "groups: '16' is not one of the choices"),
        (checkbox("log_quant", True), 0, "log_quant: 0 is not a boolean"),
        (textbox("prompt", 100, value="a"), None, "prompt: None (NoneType) is not text"),
        (model_dropdown(["tiny"], value="tiny"), 5, "model: 5 (int) is not a model name"),
    ]
    for comp, bad, msg in cases:
        with pytest.raises(gr.Error) as e:
            comp.preprocess(bad)
        assert e.value.message.startswith(msg), (e.value.message, msg)
    assert int_slider("steps", 1, 50, value=25).preprocess(7) == 7
    assert radio("baseline", [("TFMQ", "tfmq"), ("QD", "qdiff")], value="tfmq").preprocess("qdiff") == "qdiff"
    # rendered by the stock front end, with the stock config (defaults the API client relies on)
    s = int_slider("steps", 1, 50, value=25)
    assert s.get_block_name() == "slider" and s.get_config()["value"] == 25


def test_short_or_long_input_lists_get_a_message():
    from app.testing import make_engine
    from app.ui import build_demo

    demo = build_demo(make_engine(), preload=False, cache_examples=False)
    fn = next(f for f in demo.fns.values() if f.api_name == "generate")
    msg = _message(demo.validate_inputs, fn, ["a", 1, 4])
    assert re.match(r"generate: received 3 input values; allowed: exactly 18 \(Prompt, Seed", msg), msg
    assert "received 19 input values" in _message(demo.validate_inputs, fn, [None] * 19)
    assert demo.delete_cache == C.DELETE_CACHE


def test_policy_refuses_local_paths_by_default_with_one_message(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "model_index.json").write_text("{}")
    msgs = set()
    for name in (str(tmp_path / "real"), str(tmp_path / "missing"), str(tmp_path)):
        msgs.add(_message(POLICY.resolve, name).replace(repr(name[:80]), "<name>"))
    assert len(msgs) == 1, msgs  # existing and missing folders are told apart by nothing


def test_enabled_local_folder_is_one_model_under_every_spelling(tmp_path):
    import dgq

    folder = tmp_path / "models" / "m1"
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    (tmp_path / "link").symlink_to(folder)
    policy = ModelPolicy("tiny", (), allow_local=True)
    spellings = [str(folder), str(tmp_path / "models" / ".." / "models" / "m1"), str(tmp_path / "link"),
                 str(folder) + "/"]
    assert {policy.resolve(s) for s in spellings} == {str(folder.resolve())}
    assert policy.display(policy.resolve(spellings[0])) == "m1"  # named back without its path
    tiny = dgq.canonical_model("tiny")
    assert policy.resolve(str(dgq.loading.TINY_DIR / ".." / "tiny-sd")) == tiny == "tiny"
    # relative paths would depend on the server's working directory; "a/b" reads as a Hub id
    assert "not offered" in _message(policy.resolve, "models/m1")
    assert "not a diffusers pipeline folder this server can load" in _message(policy.resolve, str(tmp_path))
