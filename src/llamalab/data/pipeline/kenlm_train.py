"""Training the KenLM n-gram model the CCNet perplexity step scores with (KenLM's ``lmplz``).

``lmplz`` is built from the kenlm source package by ``make lmplz`` (into ``.venv/build/kenlm/bin``).
The training text goes through the same normalisation and SentencePiece split as the text the
model will score (`commoncrawl.normalize_for_lm`, one line of pieces per input line), so a model
trained here and the `PerplexityFilter` agree on what a token is.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["find_kenlm_tool", "train_kenlm"]


def find_kenlm_tool(name: str = "lmplz") -> str:
    """Path of a KenLM program: ``$KENLM_BIN/<name>``, the venv's build dir, or the PATH."""
    candidates = []
    if os.environ.get("KENLM_BIN"):
        candidates.append(Path(os.environ["KENLM_BIN"]) / name)
    candidates.append(Path(sys.prefix) / "build" / "kenlm" / "bin" / name)
    candidates.append(Path(__file__).resolve().parents[4] / ".venv" / "build" / "kenlm" / "bin" / name)
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    found = shutil.which(name)
    if found:
        return found
    raise FileNotFoundError(f"{name}: KenLM's program not found; build it with `make lmplz` (or set KENLM_BIN "
                            f"to the directory holding it)")


def _write_pieces(inputs: Sequence[str], sentencepiece_model: str, out: Path) -> int:
    """Write the normalised, SentencePiece-split lines of the inputs; returns the line count."""
    import sentencepiece as spm

    from llamalab.data.tokenize import iter_documents

    from .commoncrawl import normalize_for_lm
    from .sources import list_input_files

    sp = spm.SentencePieceProcessor(model_file=sentencepiece_model)
    files = list_input_files(inputs, (".jsonl", ".txt"))
    if not files:
        raise FileNotFoundError(f"{', '.join(inputs)}: no .jsonl or .txt files")
    n = 0
    with out.open("w", encoding="utf-8") as f:
        for path in files:
            for text in iter_documents(path):
                for line in text.split("\n"):
                    norm = normalize_for_lm(line)
                    if norm.strip():
                        f.write(" ".join(sp.encode(norm, out_type=str)) + "\n")
                        n += 1
    return n


def train_kenlm(inputs: Sequence[str], sentencepiece_model: str, out: str | os.PathLike[str], *, order: int = 5,
                memory: str = "1G", binary: bool = True) -> Path:
    """Train an ``order``-gram model on the inputs (.jsonl/.txt) and write it to ``out``.

    ``binary`` converts the ARPA file with ``build_binary`` (faster to load); otherwise ``out`` is
    the ARPA text. ``--discount_fallback`` lets small corpora train (their count-of-counts can make
    Kneser-Ney discounts undefined).
    """
    if order < 2:
        raise ValueError(f"order {order}: expected 2 or more")
    lmplz = find_kenlm_tool("lmplz")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = out.with_name(out.name + ".pieces.txt")
    arpa = out if not binary else out.with_name(out.name + ".arpa")
    try:
        if _write_pieces(inputs, sentencepiece_model, text) == 0:
            raise ValueError(f"{', '.join(inputs)}: no text to train on")
        with text.open("rb") as stdin, arpa.open("wb") as stdout:
            done = subprocess.run([lmplz, "-o", str(order), "-S", memory, "-T", str(out.parent),
                                   "--discount_fallback"], stdin=stdin, stdout=stdout, stderr=subprocess.PIPE)
        if done.returncode != 0:
            raise OSError(f"lmplz failed ({done.returncode}): {done.stderr.decode(errors='replace').strip()[-500:]}")
        if binary:
            done = subprocess.run([find_kenlm_tool("build_binary"), str(arpa), str(out)], capture_output=True)
            if done.returncode != 0:
                raise OSError(f"build_binary failed: {done.stderr.decode(errors='replace').strip()[-500:]}")
    finally:
        text.unlink(missing_ok=True)
        if binary:
            arpa.unlink(missing_ok=True)
    return out
