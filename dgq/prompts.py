"""Reading prompt files: the one reader the CLI, calibration, evaluation and the app share.

A text file holds one prompt per line (blank lines skipped). A CSV or TSV holds a header and a
caption column: the column `column`, else the first of caption/text/prompt (any case); a TSV
without such a column gives its first column (PartiPrompts' ``Prompt``). MS-COCO 30K files from
BK-SDM (``metadata.csv`` with ``file_name,text``) and PartiPrompts.tsv work as they are.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

PROMPT_COLUMNS = ("caption", "text", "prompt", "captions", "prompts")


def read_prompts(path: str | Path, column: str | None = None) -> list[str]:
    """The prompts of a .txt, .csv or .tsv file; clear errors for a missing, empty or
    column-less file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompts file {p} does not exist")
    if p.suffix.lower() not in (".csv", ".tsv"):
        if column is not None:
            raise ValueError(f"--prompt-column needs a .csv or .tsv file, got {p.name}")
        prompts = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if not prompts:
            raise ValueError(f"prompts file {p} holds no prompts")
        return prompts
    delim = "\t" if p.suffix.lower() == ".tsv" else ","
    reader = csv.reader(io.StringIO(p.read_text(encoding="utf-8-sig")), delimiter=delim)
    header = next(reader, None)
    if not header:
        raise ValueError(f"prompts file {p} is empty")
    lower = [h.strip().lower() for h in header]
    if column is not None:
        if column.lower() not in lower:
            raise ValueError(f"{p.name} has no column {column!r}; columns: {header}")
        idx = lower.index(column.lower())
    else:
        idx = next((lower.index(c) for c in PROMPT_COLUMNS if c in lower), 0 if delim == "\t" else -1)
        if idx < 0:
            raise ValueError(f"{p.name}: no caption column among {header}; pass --prompt-column NAME")
    prompts = [row[idx].strip() for row in reader if len(row) > idx and row[idx].strip()]
    if not prompts:
        raise ValueError(f"prompts file {p} holds no prompts in column {header[idx]!r}")
    return prompts
