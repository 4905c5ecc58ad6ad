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

    python -m benchmarks.split_weights --model tiny --bits 4,8 --samples 128
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from torch.func import functional_call

from dgq import primitives as P


def split_weight(w: torch.Tensor, split: int, bits: int, search: str = "mse") -> torch.Tensor:
    """`w` fake-quantized as Q-Diffusion's split layer does: input channels `< split` and the rest
    each with their own per-output-channel range (round-to-nearest)."""
    halves = [w[:, :split], w[:, split:]]
    return torch.cat([P.dequantize_weight(*P.quantize_weight(h, bits, search)) for h in halves], 1).to(w.dtype)


def unet_error(unet, params: dict[str, torch.Tensor], data: dict[str, torch.Tensor], ref: torch.Tensor,
               batch: int = 16) -> float:
    """Mean squared error of the UNet's output with weights `params` against `ref` (FP outputs)."""
    err, n = 0.0, data["sample"].shape[0]
    for i in range(0, n, batch):
        sl = slice(i, i + batch)
        out = functional_call(unet, params, (data["sample"][sl], data["timestep"][sl]),
                              {"encoder_hidden_states": data["encoder_hidden_states"][sl], "return_dict": False})[0]
        err += float((out.float() - ref[sl]).pow(2).sum())
    return err / ref.numel()


def measure(pipe, bits: list[int], data: dict[str, torch.Tensor]) -> dict:
    """The per-layer and whole-UNet figures of the module doc, at each width in `bits`."""
    from dgq.modules import quantized_layers
    from dgq.split import split_points

    unet = pipe.unet
    layers = quantized_layers(unet)
    splits = {n: k for n, k in split_points(unet).items() if n in layers}
    if not splits:
        raise SystemExit("this UNet has no split shortcut convs")
    with torch.no_grad():
        ref = torch.cat([functional_call(unet, {}, (data["sample"][i:i + 16], data["timestep"][i:i + 16]),
                                         {"encoder_hidden_states": data["encoder_hidden_states"][i:i + 16],
                                          "return_dict": False})[0].float()
                         for i in range(0, data["sample"].shape[0], 16)])
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
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
