"""LLaMA's Wikipedia-reference classifier: fastText, pages cited by Wikipedia vs random pages.

``llamalab data train-classifier --reference refs.jsonl --random cc.jsonl --out ref.bin`` trains a
linear fastText classifier (labels ``reference`` and ``random``) on the two sets the user supplies,
holds out a fraction to report its accuracy, and saves the model that the CommonCrawl step
`ReferenceClassifierFilter` loads. Texts are seen as one line, as at prediction time.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ClassifierReport", "reference_probability", "train_classifier"]

LABELS = ("reference", "random")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _texts(paths: Sequence[str]) -> Iterator[str]:
    from llamalab.data.tokenize import iter_documents

    from .sources import list_input_files

    files = list_input_files(paths, (".jsonl", ".txt"))
    if not files:
        raise FileNotFoundError(f"{', '.join(paths)}: no .jsonl or .txt files")
    for path in files:
        for text in iter_documents(path):
            line = _one_line(text)
            if line:
                yield line


def reference_probability(model: Any, text: str) -> float:
    """p(reference) of a text under a classifier trained by `train_classifier`."""
    labels, probs = model.predict(_one_line(text), k=len(LABELS))
    for label, p in zip(labels, probs):
        if label == "__label__reference":
            return float(min(1.0, p))
    return 0.0


@dataclass
class ClassifierReport:
    """What training produced: the model file, set sizes and held-out accuracy."""

    path: str
    n_reference: int
    n_random: int
    n_heldout: int
    heldout_accuracy: float | None


def train_classifier(reference: Sequence[str], random_pages: Sequence[str], out: str | os.PathLike[str], *,
                     heldout: float = 0.1, epoch: int = 5, lr: float = 0.1, word_ngrams: int = 2, dim: int = 64,
                     seed: int = 0, threads: int = 1) -> ClassifierReport:
    """Train and save the reference classifier; ``reference`` and ``random_pages`` are .jsonl/.txt inputs.

    Each set is shuffled with ``seed`` and ``heldout`` of it kept aside for the accuracy figure.
    ``threads=1`` (the default) makes training deterministic.
    """
    import fasttext

    if not 0.0 <= heldout < 1.0:
        raise ValueError(f"heldout {heldout}: expected a fraction in [0, 1)")
    rng = random.Random(seed)
    sets = {"reference": list(_texts(reference)), "random": list(_texts(random_pages))}
    for label, texts in sets.items():
        if len(texts) < 2:
            raise ValueError(f"train-classifier: {len(texts)} {label} page(s); expected at least 2")
    train: list[str] = []
    test: list[tuple[str, str]] = []
    for label, texts in sets.items():
        rng.shuffle(texts)
        n_test = int(len(texts) * heldout)
        test += [(label, t) for t in texts[:n_test]]
        train += [f"__label__{label} {t}" for t in texts[n_test:]]
    rng.shuffle(train)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8", delete=False,
                                     dir=out.parent) as f:
        f.write("\n".join(train) + "\n")
        train_file = f.name
    try:
        model = fasttext.train_supervised(input=train_file, epoch=epoch, lr=lr, wordNgrams=word_ngrams, dim=dim,
                                          thread=threads, seed=seed, verbose=0)
    finally:
        os.unlink(train_file)
    model.save_model(str(out))
    accuracy = None
    if test:
        correct = sum((reference_probability(model, t) >= 0.5) == (label == "reference") for label, t in test)
        accuracy = correct / len(test)
    return ClassifierReport(str(out), len(sets["reference"]), len(sets["random"]), len(test), accuracy)
