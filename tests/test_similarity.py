"""dgq.similarity: the chunked image-prompt cosine every CLIP-style scorer uses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dgq.similarity import paired_cosines


def test_chunks_give_the_pairwise_cosines_and_counts_must_match():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(7, 5, generator=g), dim=-1)
    txt = F.normalize(torch.randn(7, 5, generator=g), dim=-1)
    seen = []

    def embed(chunk):
        seen.append((chunk.start, chunk.stop))
        return img[chunk], txt[chunk]

    out = paired_cosines(7, ["p"] * 7, 3, embed)
    np.testing.assert_allclose(out, (img * txt).sum(-1).numpy(), atol=1e-6)
    assert seen == [(0, 3), (3, 6), (6, 9)]
    assert paired_cosines(0, [], 3, embed).shape == (0,)
    with pytest.raises(ValueError, match="7 images but 6 prompts"):
        paired_cosines(7, ["p"] * 6, 3, embed)
