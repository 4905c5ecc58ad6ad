"""The one prompt-file reader (`dgq.prompts`)."""

from __future__ import annotations

import pytest

import dgq
from dgq.prompts import read_prompts


def test_text_files_skip_blank_lines_and_errors_are_clear(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a red circle\n\n  a blue square  \n")
    assert read_prompts(f) == ["a red circle", "a blue square"] == dgq.read_prompts(f)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="holds no prompts"):
        read_prompts(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="needs a .csv or .tsv"):
        read_prompts(f, column="text")
