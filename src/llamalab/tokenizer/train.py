"""Train a SentencePiece BPE tokenizer the way LLaMA 1/2's `tokenizer.model` was trained."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from llamalab.textio import iter_jsonl_texts

from .base import TokenizerError

__all__ = ["LLAMA_TRAINER_DEFAULTS", "iter_sentences", "train_sentencepiece"]

# Trainer settings of the released LLaMA tokenizer. Unless noted, each value is the one stored in
# the `trainer_spec` / `normalizer_spec` of Meta's LLaMA 1/2 `tokenizer.model` (its protobuf keeps
# the options it was trained with). The LLaMA paper (Touvron et al. 2023, section 2.1) states the
# headline choices: BPE via SentencePiece, numbers split into digits, byte fallback for unknown
# UTF-8 characters.
LLAMA_TRAINER_DEFAULTS: dict[str, Any] = {
    "model_type": "bpe",  # paper + trainer_spec
    "split_digits": True,  # paper: "we split all numbers into individual digits"
    "byte_fallback": True,  # paper: "fallback to bytes to decompose unknown UTF-8 characters"
    "character_coverage": 0.99995,  # trainer_spec
    "normalization_rule_name": "identity",  # normalizer_spec: no NFKC, text is kept as is
    "add_dummy_prefix": True,  # normalizer_spec
    "remove_extra_whitespaces": False,  # normalizer_spec: whitespace runs matter for code
    "allow_whitespace_only_pieces": True,  # trainer_spec: lets indentation become single pieces
    "split_by_unicode_script": True,  # trainer_spec
    "split_by_whitespace": True,  # trainer_spec
    "split_by_number": True,  # trainer_spec
    "max_sentencepiece_length": 16,  # trainer_spec
    "max_sentence_length": 4192,  # trainer_spec (bytes; longer sentences are skipped)
    "input_sentence_size": 200_000_000,  # trainer_spec: sample at most this many sentences
    "shuffle_input_sentence": True,  # trainer_spec: the sample is a random one
    "unk_id": 0,  # trainer_spec: <unk>
    "bos_id": 1,  # trainer_spec: <s>
    "eos_id": 2,  # trainer_spec: </s>
    "pad_id": -1,  # trainer_spec: LLaMA has no pad piece
    "unk_surface": " \u2047 ",  # trainer_spec: what <unk> decodes to
    "vocabulary_output_piece_score": True,  # trainer_spec: scores give the merge order
    "hard_vocab_limit": True,  # trainer_spec
    "num_threads": os.cpu_count() or 1,  # not Meta's 80: use this machine's cores
}


def _iter_txt(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\r\n")
            if line:
                yield line


def _iter_jsonl(path: Path) -> Iterator[str]:
    # SentencePiece trains on sentences without newlines; a document's lines become sentences.
    for text in iter_jsonl_texts(path, "text", TokenizerError):
        for part in text.splitlines():
            if part:
                yield part


def iter_sentences(inputs: Sequence[str | os.PathLike[str]]) -> Iterator[str]:
    """Stream the training sentences of `.txt` (one per line) and `.jsonl` (`{"text": ...}`) files."""
    for item in inputs:
        path = Path(item)
        if path.suffix == ".jsonl":
            yield from _iter_jsonl(path)
        else:
            yield from _iter_txt(path)


def _check_inputs(inputs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    paths = [Path(p) for p in inputs]
    if not paths:
        raise TokenizerError("train_sentencepiece: expected at least one .txt or .jsonl input file")
    for path in paths:
        if not path.is_file():
            raise TokenizerError(f"{path}: no such file; expected a .txt or .jsonl training corpus")
        if path.suffix not in (".txt", ".jsonl"):
            raise TokenizerError(f"{path}: expected a .txt or .jsonl training corpus")
    return paths


def train_sentencepiece(
    inputs: Sequence[str | os.PathLike[str]],
    model_prefix: str | os.PathLike[str],
    vocab_size: int = 32000,
    **overrides: Any,
) -> Path:
    """Train a LLaMA-style SentencePiece BPE model and return the path of `<model_prefix>.model`.

    `inputs` are `.txt` files (one sentence/document per line) and `.jsonl` files (one
    `{"text": ...}` object per line); they are streamed, never loaded whole. `overrides` replace
    entries of `LLAMA_TRAINER_DEFAULTS` or pass any other SentencePiece trainer option.
    Raises TokenizerError for missing files, malformed JSONL lines and empty corpora.
    """
    import sentencepiece as spm

    paths = _check_inputs(inputs)
    sentences = iter_sentences(paths)
    # Look at the first sentence before starting the trainer: an empty corpus would otherwise
    # fail deep inside SentencePiece with a message that names no file.
    first = next(sentences, None)
    if first is None:
        raise TokenizerError(f"{', '.join(map(str, paths))}: the training corpus is empty; expected text")

    # An error raised while SentencePiece pulls sentences reaches us as a RuntimeError holding
    # only its text; keep the original so the caller gets the TokenizerError naming file:line.
    reader_errors: list[BaseException] = []

    def everything() -> Iterator[str]:
        yield first
        try:
            yield from sentences
        except Exception as e:
            reader_errors.append(e)
            raise

    prefix = Path(model_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    options = {**LLAMA_TRAINER_DEFAULTS, "vocab_size": vocab_size, **overrides}
    options.setdefault("minloglevel", 2)  # the trainer is chatty on stderr
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=everything(), model_prefix=str(prefix), **options)
    except RuntimeError as e:
        if reader_errors:
            raise reader_errors[0] from None
        raise TokenizerError(f"{', '.join(map(str, paths))}: SentencePiece training failed: {e}") from e
    return prefix.with_name(prefix.name + ".model")
