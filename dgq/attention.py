"""One attention processor for quantization and analysis.

`DGQAttnProcessor` has diffusers' processor signature and computes the softmax explicitly, so
Q, K, V and the probabilities can be quantized (uniform, or log2 with a dynamic scale and the
`<start>` column in FP) and handed to a recorder. With no active run it takes PyTorch's fused
attention path. It is installed with `set_attn_processor`; the originals are kept and restored.
A forward pre-hook on the UNet tells the active run which timestep is being denoised.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

from dgq import int8 as int8_exec
from dgq.context import active
from dgq.quantizer import apply_act, apply_prob

_ORIGINALS = "_dgq_original_processors"
_HOOK = "_dgq_timestep_hook"
# Largest score buffer (elements) kept for reuse on CPU: 2^26 fp32 = 256 MiB per thread
_WORKSPACE_MAX = 1 << 26
_WS = threading.local()


def _scores_buffer(shape: torch.Size, like: torch.Tensor) -> torch.Tensor | None:
    """A reusable fp32 buffer for the [B, heads, Nq, Nk] scores/probabilities on CPU.

    The explicit path materialises the probability map (it is what gets quantized). On CPU a
    fresh buffer of that size is a fresh mapping from the allocator each call, and its page
    faults cost more than the matmul that fills it (3.0 vs 1.1 ms per 16×16 self-attention
    of the embedded model). One buffer per (thread, shape), reused: every observer reduces the
    probabilities before the next attention call, and nothing returned aliases it (P·V is a new
    tensor). GPUs have a caching allocator, so there it returns None (allocate normally)."""
    if like.device.type != "cpu" or shape.numel() > _WORKSPACE_MAX:
        return None
    bufs = getattr(_WS, "bufs", None)
    if bufs is None:
        bufs = _WS.bufs = {}
    buf = bufs.get(shape)
    if buf is None:
        if len(bufs) >= 8:  # a handful of resolutions per UNet; bound the memory
            bufs.pop(next(iter(bufs)))
        buf = bufs[shape] = torch.empty(shape, dtype=torch.float32)
    return buf


class DGQAttnProcessor:
    """Explicit-softmax attention that quantizes and records when a run asks for it."""

    def __init__(self, name: str, cross: bool) -> None:
        self.name = name  # module path of the Attention, e.g. "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
        self.cross = cross

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args, **kwargs) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        b, h = query.shape[0], attn.heads
        d = query.shape[-1] // h
        q = query.view(b, -1, h, d).transpose(1, 2)  # [B, heads, Nq, d]
        k = key.view(b, -1, h, d).transpose(1, 2)  # [B, heads, Nk, d]
        v = value.view(b, -1, h, d).transpose(1, 2)

        out = self._attend(attn, q, k, v, attention_mask)
        out = out.transpose(1, 2).reshape(b, -1, h * d).to(query.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _attend(self, attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        """softmax(Q·Kᵀ·scale)·V on [B, heads, N, d]: the fused kernel unless a run quantizes or
        observes (a subclass may compute it otherwise: `dgq.act_recon` learns step sizes through it)."""
        ctx = active()
        if ctx is None or (ctx.params is None and ctx.collector is None and ctx.recorder is None):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scale)
        return self._explicit(ctx, attn, q, k, v, mask)

    def _explicit(self, ctx, attn, q, k, v, mask) -> torch.Tensor:
        name, cross = self.name, self.cross
        if ctx.collector is not None:
            ctx.collector.observe(f"{name}.q", q, "q", cross)
            ctx.collector.observe(f"{name}.k", k, "k", cross)
            ctx.collector.observe(f"{name}.v", v, "v", cross)
        params = ctx.params
        scores = None
        if int8_exec.wants_int8(ctx):  # Q·Kᵀ on int8 codes (None = it fell back, logged once)
            aq, ak = params.act(f"{name}.q", ctx.t_key), params.act(f"{name}.k", ctx.t_key)
            if aq is not None and ak is not None:
                scores = int8_exec.attention_scores(f"{name}.qk", q, k, aq, ak, attn.scale)
        if params is not None:
            for site, kind in (("q", "q"), ("k", "k"), ("v", "v")):
                if scores is not None and site != "v":
                    continue  # already consumed as codes by the integer Q·Kᵀ
                aq = params.act(f"{name}.{site}", ctx.t_key)
                if aq is None:
                    continue
                slot = (id(self), site)  # consumed by this call's matmuls
                if site == "q":
                    q = apply_act(q, aq, kind, slot)
                elif site == "k":
                    k = apply_act(k, aq, kind, slot)
                else:
                    v = apply_act(v, aq, kind, slot)
        q, k = q.float(), k.float()
        b, h, n, d = q.shape
        nk = k.shape[-2]
        # one batched GEMM over (batch, head) with the softmax scale folded in (no extra pass
        # over the scores); q and k are views of the quantizer's contiguous [B, heads, T, d]
        # output, copies only on the unquantized or eager path
        if scores is None:
            buf = _scores_buffer(torch.Size((b, h, n, nk)), q)
            scores = q.new_empty((b, h, n, nk)) if buf is None else buf
            scores.view(b * h, n, nk).baddbmm_(q.reshape(b * h, n, d), k.reshape(b * h, nk, d).transpose(1, 2),
                                               beta=0.0, alpha=attn.scale)
        if mask is not None:
            scores += mask.float()
        probs = torch.softmax(scores, -1, out=scores)
        if ctx.collector is not None:
            ctx.collector.observe_probs(f"{name}.p", probs, cross)
        if ctx.recorder is not None:
            ctx.recorder.observe_attention(name, probs, cross, ctx)
        if params is not None:
            pq = params.prob(f"{name}.p", ctx.t_key)
            if pq is not None:
                probs = apply_prob(probs, pq, inplace=True)
        return torch.matmul(probs.to(v.dtype), v)


def _timestep_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    ctx = active()
    if ctx is None:
        return
    t = args[1] if len(args) > 1 else kwargs.get("timestep")
    sample = args[0] if args else kwargs.get("sample")
    if torch.is_tensor(t):
        t = float(t.flatten()[0])
    if ctx.recorder is not None and sample is not None:
        ctx.recorder.set_latent_shape(tuple(sample.shape[-2:]))
    ctx.on_unet_call(float(t))


def install_attention(unet: nn.Module) -> None:
    """Install a `DGQAttnProcessor` on every attention module and the timestep hook (idempotent)."""
    if getattr(unet, _ORIGINALS, None) is not None:
        return
    originals = dict(unet.attn_processors)
    procs = {}
    for key in originals:
        mod_name = key[: -len(".processor")]
        procs[key] = DGQAttnProcessor(mod_name, cross=bool(getattr(unet.get_submodule(mod_name), "is_cross_attention", False)))
    unet.set_attn_processor(dict(procs))
    setattr(unet, _ORIGINALS, originals)
    setattr(unet, _HOOK, unet.register_forward_pre_hook(_timestep_pre_hook, with_kwargs=True))


def uninstall_attention(unet: nn.Module) -> None:
    originals = getattr(unet, _ORIGINALS, None)
    if originals is None:
        return
    unet.set_attn_processor(dict(originals))
    getattr(unet, _HOOK).remove()
    delattr(unet, _ORIGINALS)
    delattr(unet, _HOOK)


def attention_names(unet: nn.Module) -> list[str]:
    return [k[: -len(".processor")] for k in unet.attn_processors]
