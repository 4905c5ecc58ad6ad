"""How much splitting the shortcut convs' *weights* would change: the size of a documented deviation.

Q-Diffusion's `--split` gives a split layer (the up blocks' 1×1 `conv_shortcut`, whose input is
`cat([h, skip])`, `dgq.split`) two weight quantizers, one per half of the input channels, each
with its own per-output-channel range; `qdiff-paper` and `tfmq-paper` split the activations only
and keep one per-output-channel range for the weights (the AdaRound file they share with DGQ).
This measures, with round-to-nearest weights (MSE-searched ranges) and FP activations:

* per split layer, the weight error |w − ŵ|² with one range per output channel against one per
  (output channel, half);
* the whole UNet's output error against FP on UNet inputs drawn from the calibration runs, with
  every quantized layer at W bits and the split layers quantized either way.

With `--adaround`, the recipe the paper baselines actually use: each of the six ResNet blocks that
holds a split layer is reconstructed (BRECQ/AdaRound, `dgq.reconstruction.learn_unit`, the
shipped settings) twice from the same inputs — the block's inputs in the network with the shipped
AdaRound weights, targets from FP — once with one weight range per output channel and once with
the shortcut's weights split; the block's output MSE and the whole UNet's (every other layer at
the shipped AdaRound rounding) are compared. Each block is learned on its own, not in sequence.

    python -m benchmarks.split_weights --model tiny --bits 4,8 --samples 128
    python -m benchmarks.split_weights --model tiny --bits 4 --adaround
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from dgq import primitives as P


def split_weight(w: torch.Tensor, split: int, bits: int, search: str = "mse") -> torch.Tensor:
    """`w` fake-quantized as Q-Diffusion's split layer does: input channels `< split` and the rest
    each with their own per-output-channel range (round-to-nearest)."""
    halves = [w[:, :split], w[:, split:]]
    return torch.cat([P.dequantize_weight(*P.quantize_weight(h, bits, search)) for h in halves], 1).to(w.dtype)


@torch.no_grad()
def unet_outputs(unet, params: dict[str, torch.Tensor], data: dict[str, torch.Tensor], batch: int = 16) -> torch.Tensor:
    """The UNet's outputs over every row of `data`, with the weights in `params` (`{}`: FP)."""
    from dgq.reconstruction import run_unet

    return torch.cat([run_unet(unet, params, data, slice(i, i + batch)).float()
                      for i in range(0, data["sample"].shape[0], batch)])


def unet_error(unet, params: dict[str, torch.Tensor], data: dict[str, torch.Tensor], ref: torch.Tensor) -> float:
    """Mean squared error of the UNet's output with weights `params` against `ref` (FP outputs)."""
    return float((unet_outputs(unet, params, data) - ref).pow(2).mean())


def measure(pipe, bits: list[int], data: dict[str, torch.Tensor]) -> dict:
    """The per-layer and whole-UNet figures of the module doc, at each width in `bits`."""
    from dgq.modules import quantized_layers
    from dgq.split import split_points

    unet = pipe.unet
    layers = quantized_layers(unet)
    splits = {n: k for n, k in split_points(unet).items() if n in layers}
    if not splits:
        raise SystemExit("this UNet has no split shortcut convs")
    ref = unet_outputs(unet, {}, data)
    with torch.no_grad():
        rows = []
        for b in bits:
            one = {n: layer.quantized_weight(b) for n, layer in layers.items()}
            two = dict(one, **{n: split_weight(layers[n].weight, k, b, layers[n].weight_search) for n, k in splits.items()})
            per_layer = [{"layer": n, "split": k, "in_channels": int(layers[n].weight.shape[1]),
                          "weight_mse_one_range": float((one[n] - layers[n].weight).pow(2).mean()),
                          "weight_mse_split": float((two[n] - layers[n].weight).pow(2).mean())}
                         for n, k in splits.items()]
            e1 = unet_error(unet, {f"{n}.weight": w for n, w in one.items()}, data, ref)
            e2 = unet_error(unet, {f"{n}.weight": w for n, w in two.items()}, data, ref)
            rows.append({"bits": b, "layers": per_layer, "unet_mse_one_range": e1, "unet_mse_split": e2,
                         "unet_change": e2 / e1 - 1 if e1 > 0 else 0.0})
    return {"samples": int(data["sample"].shape[0]), "split_layers": len(splits), "quantized_layers": len(layers),
            "rows": rows}


class _Half:
    """One half of a split layer's weight, as a layer `learn_unit` can round."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight


def adaround_blocks(pipe, bits: int, data: dict[str, torch.Tensor], settings=None) -> dict:
    """The `--adaround` figures of the module doc at `bits` (the shipped rounding must be loaded
    into the layers: `Studio.load_rounding(bits)`)."""
    from dgq import adaround as AR
    from dgq import reconstruction as R
    from dgq.modules import quantized_layers
    from dgq.split import split_points

    settings = settings or AR.ReconSettings()
    unet = pipe.unet
    layers = quantized_layers(unet)
    splits = {n: k for n, k in split_points(unet).items() if n in layers}
    for layer in layers.values():
        layer.quantized_weight(bits)  # the per-channel ranges the rounding was learned on
    shipped = {n: layer.quantized_weight(bits, "adaround").detach() for n, layer in layers.items()}
    ref = unet_outputs(unet, {}, data)
    plan = R.units(unet, layers)
    one_w, two_w, rows = dict(shipped), dict(shipped), []
    for sc, k in splits.items():
        unit = next(u for u in plan if sc in u.layers)
        args, kwargs, _ = R.capture(unet, unit, data, shipped, with_output=False)
        target = R.capture(unet, unit, data, None, with_output=True)[2]
        n = target.shape[0]
        run = R._runner(unit, args, kwargs, n)
        ranges = {ln: layers[ln]._dgq_wranges[(bits, layers[ln].weight_search)] for ln in unit.layers}
        gen = torch.Generator().manual_seed(settings.seed)
        masks = R.learn_unit(unit, layers, ranges, bits, None, None, target, settings, gen, forward=run)
        one = {ln: R._dequant(layers[ln], masks[ln], *ranges[ln], bits) for ln in unit.layers}
        # the same block with the shortcut's weight as two layers, one per half of its input channels
        w = layers[sc].weight.detach()
        halves = {f"{sc}#0": _Half(w[:, :k]), f"{sc}#1": _Half(w[:, k:])}
        v_layers = dict({ln: layers[ln] for ln in unit.layers if ln != sc}, **halves)
        v_ranges = dict({ln: ranges[ln] for ln in unit.layers if ln != sc},
                        **{h: P.quantize_weight(x.weight, bits, layers[sc].weight_search)[1:] for h, x in halves.items()})
        v_unit = R.Unit(unit.name, unit.module, list(v_layers))

        def joined(weights: dict[str, torch.Tensor], idx: torch.Tensor, sc=sc, run=run) -> torch.Tensor:
            ws = dict(weights)
            ws[sc] = torch.cat([ws.pop(f"{sc}#0"), ws.pop(f"{sc}#1")], 1)
            return run(ws, idx)

        gen = torch.Generator().manual_seed(settings.seed)
        v_masks = R.learn_unit(v_unit, v_layers, v_ranges, bits, None, None, target, settings, gen, forward=joined)
        two = {ln: R._dequant(v_layers[ln], v_masks[ln], *v_ranges[ln], bits) for ln in v_layers}
        two[sc] = torch.cat([two.pop(f"{sc}#0"), two.pop(f"{sc}#1")], 1)
        rows.append({"block": unit.name, "split": k,
                     "block_mse_shipped": R._mse(unit, None, None, target, {ln: shipped[ln] for ln in unit.layers}, run),
                     "block_mse_one_range": R._mse(unit, None, None, target, one, run),
                     "block_mse_split": R._mse(unit, None, None, target, two, run)})
        one_w.update(one)
        two_w.update(two)
    e = {name: unet_error(unet, {f"{n}.weight": x for n, x in ws.items()}, data, ref)
         for name, ws in (("shipped", shipped), ("one_range", one_w), ("split", two_w))}
    return {"bits": bits, "blocks": rows, "unet_mse_shipped": e["shipped"], "unet_mse_one_range": e["one_range"],
            "unet_mse_split": e["split"], "unet_change": e["split"] / e["one_range"] - 1 if e["one_range"] > 0 else 0.0}


def adaround_table(rows: list[dict]) -> str:
    lines = ["| W | block output MSE, split / one range (min … max over the 6 blocks) | UNet output MSE vs FP: "
             "shipped rounding | blocks re-learned, one range | blocks re-learned, split | change |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        ratios = [b["block_mse_split"] / b["block_mse_one_range"] - 1 for b in r["blocks"]]
        lines.append(f"| W{r['bits']} | {100 * min(ratios):+.1f} … {100 * max(ratios):+.1f} % | "
                     f"{r['unet_mse_shipped']:.4e} | {r['unet_mse_one_range']:.4e} | {r['unet_mse_split']:.4e} | "
                     f"{100 * r['unet_change']:+.2f} % |")
    return "\n".join(lines)


def table(result: dict) -> str:
    lines = [f"{result['split_layers']} split layers of {result['quantized_layers']} quantized, "
             f"{result['samples']} UNet inputs, nearest weights, FP activations", "",
             "| W | weight error of the split layers, split / one range (min … max) | UNet output MSE vs FP, one range "
             "| split | change |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        ratios = [x["weight_mse_split"] / x["weight_mse_one_range"] - 1 for x in r["layers"]]
        lines.append(f"| W{r['bits']} | {100 * min(ratios):+.1f} … {100 * max(ratios):+.1f} % | "
                     f"{r['unet_mse_one_range']:.4e} | {r['unet_mse_split']:.4e} | {100 * r['unet_change']:+.2f} % |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from dgq import reconstruction as R
    from dgq.adaround import ReconSettings
    from dgq.loading import default_guidance, load_pipeline
    from dgq.modules import quantize_
    from dgq.studio import default_calibration_prompts

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--bits", default="4,8", help="weight bits, comma-separated")
    ap.add_argument("--samples", type=int, default=128, help="UNet inputs drawn from the 64 calibration prompts' runs")
    ap.add_argument("--adaround", action="store_true", help="also reconstruct the six blocks with and without the "
                    "split (AdaRound, the shipped settings; needs the stored rounding at each W)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    a = ap.parse_args(argv)
    try:
        bits = [int(b) for b in a.bits.split(",") if b.strip()]
    except ValueError:
        print(f"error: --bits {a.bits!r} is not a comma-separated list of integers", file=sys.stderr)
        return 2
    if not bits or any(not 2 <= b <= 8 for b in bits) or a.samples < 1:
        print("error: need 2 <= bits <= 8 and --samples >= 1", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    pipe = load_pipeline(a.model)
    quantize_(pipe.unet)
    data = R.sample_inputs(pipe, ReconSettings(samples=a.samples), default_calibration_prompts(a.model),
                           default_guidance(pipe))
    result = measure(pipe, bits, data)
    print(table(result))
    if a.adaround:
        from dgq.studio import Studio, calibrate

        studio = Studio(pipe, calibrate(pipe))
        missing = [b for b in bits if not studio.load_rounding(b)]
        if missing:
            print(f"error: no stored AdaRound rounding at W{missing[0]}: run `python -m dgq reconstruct --model "
                  f"{a.model} --w-bits {missing[0]}`", file=sys.stderr)
            return 2
        with R.torch_threads(1):
            result["adaround"] = [adaround_blocks(pipe, b, data) for b in bits]
        print()
        print(adaround_table(result["adaround"]))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
