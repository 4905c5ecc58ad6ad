"""`dgq.record`: attach a `Recorder` to what runs in a block — `Studio.generate` calls or a plain
pipeline call (the DAAM way, ``with dgq.record(pipe) as rec: pipe(prompt)``).

Apart from `dgq.recorder` (what is recorded and its views) because it ties the recorder to the
run context and to the wrapped UNet, which themselves only know the recorder's type.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from dgq import context
from dgq.modules import quantize_
from dgq.recorder import Recorder, token_names


@contextmanager
def record(pipe: Any = None, **kwargs: Any) -> Iterator[Recorder]:
    """Attach a new `Recorder` to the generations run in this block (this thread only).

    Without a pipeline it records what `Studio.generate` runs. With one, it also records an
    ordinary pipeline call, as DAAM's ``with trace(pipe)`` does: the UNet is wrapped if it is not
    yet (FP output unchanged), the prompt's tokens are read from the text encoder's first call and
    whether the batch holds CFG halves from the UNet's batch; quantized runs come from an
    enclosing or enclosed `studio.use(config)`.

    Example:
        >>> with dgq.record() as rec:
        ...     studio.generate("a red circle on the left", seed=0)
        >>> with dgq.record(pipe) as rec, studio.use(dgq.DGQConfig(8, 6)):
        ...     pipe("a red circle on the left", generator=torch.Generator().manual_seed(0))
        >>> rec.cross_attention("<start>", resolution=16)
    """
    if context.pending_recorder() is not None:
        raise RuntimeError("a recorder is already attached in this context")
    rec = Recorder(**kwargs)
    token = context.PENDING.set(rec)
    handles: list[Any] = []
    ctx_token = None
    attached = None
    try:
        if pipe is not None:
            quantize_(pipe.unet)
            prompts = {"n": 0}

            def on_text(_module: Any, args: tuple, kw: dict) -> None:
                ids = args[0] if args else kw.get("input_ids")
                if ids is None or prompts["n"]:
                    return
                prompts["n"] = int(ids.shape[0])
                row = [int(i) for i in ids[0].tolist()]
                eos = getattr(pipe.tokenizer, "eos_token_id", None)
                if eos in row:
                    row = row[: row.index(eos) + 1]
                rec.tokens = token_names(pipe.tokenizer, row)

            def on_unet(_module: Any, args: tuple, kw: dict) -> None:
                sample = args[0] if args else kw.get("sample")
                if sample is not None and prompts["n"]:
                    rec.cfg = int(sample.shape[0]) == 2 * prompts["n"]

            handles.append(pipe.text_encoder.register_forward_pre_hook(on_text, with_kwargs=True))
            handles.append(pipe.unet.register_forward_pre_hook(on_unet, with_kwargs=True, prepend=True))
            ctx = context.active()
            if ctx is None:
                ctx_token = context.ACTIVE.set(context.RunContext(recorder=rec))
            elif ctx.recorder is None:
                ctx.recorder, attached = rec, ctx
        yield rec
    finally:
        for h in handles:
            h.remove()
        if attached is not None:
            attached.recorder = None
        if ctx_token is not None:
            context.ACTIVE.reset(ctx_token)
        context.PENDING.reset(token)
