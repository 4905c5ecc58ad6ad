"""Image–prompt cosine similarity over a batch of pairs, in chunks: what a CLIP score is made of.

One loop for every CLIP-style scorer (`dgq.metrics.ClipScorer` for SD with open_clip weights,
`dgq.tiny.clip.DomainClipScorer` for the embedded model), so both count, batch and clamp alike;
each scorer only says how it embeds one chunk.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch


def paired_cosines(n_images: int, prompts: Sequence[str], batch_size: int,
                   embed: Callable[[slice], tuple[torch.Tensor, torch.Tensor]]) -> np.ndarray:
    """Cosine of image i with prompt i, shape (N,), in [-1, 1]. `embed(chunk)` returns the chunk's
    L2-normalised image and text embeddings; a prompt count other than the image count is an error."""
    if len(prompts) != n_images:
        raise ValueError(f"{n_images} images but {len(prompts)} prompts")
    out = []
    for i in range(0, n_images, batch_size):
        img, txt = embed(slice(i, i + batch_size))
        out.append((img * txt).sum(-1).clamp(-1, 1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)
