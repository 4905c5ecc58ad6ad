"""Bad-input probe of the served app: every parameter of `/generate` gets values of the wrong type,
out of range, non-finite, of the wrong shape and hostile strings, through gradio_client and as raw
HTTP (short and long data lists), and each answer is classified.

    python -m benchmarks.probe_inputs                 # random-weights model, a few minutes
    python -m benchmarks.probe_inputs --model tiny

Classes: `clear` (an error whose message starts with the parameter's name, or the endpoint's for a
wrong number of values), `vague` (no message, Gradio's "upstream app has raised an exception", or
an internal error), `coerced` (the call succeeded although the value is not allowed), `leak` (a
message naming a server path). Prints one JSON line with the counts and the non-clear cases.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PARAMS = ["prompt", "seed", "steps", "guidance", "model", "w_bits", "a_bits", "groups", "baseline", "use_groups",
          "axis", "log_quant", "start_token", "dynamic_scale", "time_aware", "weight_rounding", "execution"]
GOOD = dict(prompt="a large red circle on the left", seed=1, steps=2, guidance=7.5, model="", w_bits=8, a_bits=6,
            groups=16, baseline="tfmq", use_groups=True, axis="auto", log_quant=True, start_token=True,
            dynamic_scale=True, time_aware=True, weight_rounding="nearest", execution="simulated")
NAN = math.nan


def cases(home: str, upload: str) -> list[tuple[str, object]]:
    """(parameter, bad value) pairs."""
    wrong_types = ["abc", "4", "", None, [1], {"a": 1}, True, 1.5, NAN, math.inf, -math.inf]
    out: list[tuple[str, object]] = []
    for p in ("seed", "steps", "w_bits", "a_bits"):
        out += [(p, v) for v in wrong_types]
        out += [(p, v) for v in (-1, 10**12, 2.5, 4.5, 0.5)]
    out += [("steps", v) for v in (0, 51, 1000)] + [("w_bits", v) for v in (1, 9)] + [("a_bits", v) for v in (3, 9)]
    out += [("guidance", v) for v in ("abc", "7.5", None, [7.5], True, NAN, math.inf, -1.0, 20.5, 1e9)]
    out += [("groups", v) for v in (3, 0, 32, "16", 16.5, True, None, [16], NAN)]
    for p in ("baseline", "axis", "weight_rounding", "execution"):
        out += [(p, v) for v in ("gptq", "", "TFMQ", 1, None, True, ["tfmq"], "auto " if p == "axis" else "tfmq ")]
    out += [("execution", "int8")]  # at a_bits = 6: int8 runs only at A = 8
    out += [("weight_rounding", "adaround")]  # a random model has no learned rounding
    for p in ("use_groups", "log_quant", "start_token", "dynamic_scale", "time_aware"):
        out += [(p, v) for v in ("yes", "true", 1, 0, None, [True], NAN)]
    out += [("prompt", v) for v in ("", "   ", "\u200b\u200b", "\u200d", "\t\n", 123, 1.5, True, None, ["a", "b"],
                                     {"a": 1}, "a\x00b", "a\x07b", "x" * 5000, "lone \ud800 surrogate")]
    out += [("model", v) for v in (123, True, None, ["tiny"], {"m": 1}, "m" * 10_000, "/", "/etc", "/etc/passwd",
                                    "~", "~/.ssh", home, os.path.join(home, ".ssh"), ".", "..", "../..", "./assets",
                                    "assets/tiny-sd", "assets/../assets/tiny-sd", upload, "someone/not-a-model",
                                    "CompVis/stable-diffusion-v1-5", "file:///etc", "http://example.com/m",
                                    "tiny\x00", "a\ud800", "TINY", " tiny")]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="random", help="'random' (random weights) or 'tiny'")
    args = ap.parse_args()

    import gradio_client
    import httpx

    from app.engine import Engine
    from app.testing import CALIB_PROMPTS, launch, random_model_folder

    if args.model == "random":
        engine = Engine(default_model=random_model_folder(), calib_prompts=CALIB_PROMPTS, calib_steps=4)
    else:
        engine = Engine(default_model=args.model)
    demo, url = launch(engine)
    engine.model()
    client = gradio_client.Client(url, verbose=False)
    upload = tempfile.NamedTemporaryFile(suffix=".json", delete=False).name
    server_paths = [str(Path.home()), str(Path(__file__).resolve().parents[1]), tempfile.gettempdir() + "/dgq"]

    results = {"clear": 0, "vague": 0, "coerced": 0, "leak": 0}
    bad: list[dict] = []

    def classify(param: str, value: object, ok: bool, msg: str | None) -> None:
        if ok:
            kind = "coerced"
        elif not msg or "upstream Gradio app" in msg or msg.startswith("internal error"):
            kind = "vague"
        elif any(p in msg for p in server_paths if p not in str(value)):
            kind = "leak"
        elif msg.startswith(f"{param}:") or (param == "data" and msg.startswith("generate:")):
            kind = "clear"
        else:
            kind = "vague"
        results[kind] += 1
        if kind != "clear":
            bad.append({"param": param, "value": repr(value)[:60], "class": kind, "message": (msg or "")[:160]})

    def raw(data: list) -> str | None:
        """POST a data list as raw HTTP (NaN and lone surrogates as JSON writes them); the error
        message, or None on success."""
        body = json.dumps({"data": data}, allow_nan=True, ensure_ascii=True)
        r = httpx.post(f"{url}gradio_api/call/generate", content=body, timeout=60,
                       headers={"Content-Type": "application/json"})
        if r.status_code != 200:
            return f"HTTP {r.status_code}: {r.text[:100]}"
        ev = r.json()["event_id"]
        text = httpx.get(f"{url}gradio_api/call/generate/{ev}", timeout=600).text
        if "event: error" not in text:
            return None
        payload = text.split("event: error", 1)[1].split("data:", 1)[1].strip().splitlines()[0]
        try:
            return (json.loads(payload) or {}).get("error") if payload.startswith("{") else json.loads(payload)
        except json.JSONDecodeError:
            return payload

    for param, value in cases(str(Path.home()), upload):
        kw = dict(GOOD, **{param: value})
        try:
            client.predict(**kw, api_name="/generate")
            classify(param, value, True, None)
        except gradio_client.exceptions.AppError as e:
            classify(param, value, False, str(e))
        except (ValueError, UnicodeEncodeError):  # the client cannot encode NaN or a lone surrogate: raw HTTP
            msg = raw([kw[p] for p in PARAMS] + [None])
            classify(param, value, msg is None, msg)

    good = [GOOD[p] for p in PARAMS] + [None]  # the last input is the session state
    for data in (good[:3], good[:1], [], good + ["extra"], good[:-2]):
        msg = raw(data)
        classify("data", f"{len(data)} values", msg is None, msg)
    demo.close()
    print(json.dumps({"model": args.model, "cases": sum(results.values()), **results, "not_clear": bad}))


if __name__ == "__main__":
    main()
