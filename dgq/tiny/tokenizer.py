"""SD v1.x's CLIP tokenizer, built offline from the BPE vocabulary shipped in open_clip_torch.

The Hub is often unreachable, but open_clip ships the very BPE file CLIP was trained with. A
transformers `CLIPTokenizer` built from it gives SD v1.4's token ids exactly (checked in
tests against open_clip's own tokenizer and against known ids).
"""

from __future__ import annotations

import gzip
from pathlib import Path

from transformers import CLIPTokenizer

_MERGES_END = 49152 - 256 - 2 + 1  # what CLIP and transformers keep of the file


def _bpe_path() -> Path:
    import open_clip  # noqa: PLC0415 - heavy import only when needed

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.exists():
        raise FileNotFoundError(f"open_clip_torch does not ship {path.name}; reinstall open_clip_torch")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def build_clip_tokenizer(out_dir: str | Path | None = None) -> CLIPTokenizer:
    """Return SD v1.x's tokenizer (77 tokens, pads with `<|endoftext|>`); save it if `out_dir`."""
    text = gzip.open(_bpe_path()).read().decode("utf-8")
    lines = text.split("\n")
    merges = [tuple(m.split()) for m in lines[1:_MERGES_END]]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    tok = CLIPTokenizer(
        vocab={t: i for i, t in enumerate(vocab)},
        merges=merges,
        model_max_length=77,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    if out_dir is not None:
        tok.save_pretrained(str(out_dir))
    return tok
