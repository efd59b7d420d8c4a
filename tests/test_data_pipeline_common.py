"""Shared pipeline steps: CCNet normalisation, fastText language ID (real lid.176), exact dedup."""

from __future__ import annotations

import hashlib
import json

import fasttext
from datatrove.data import Document

from llamalab.data.pipeline.common import (
    ExactDedupFilter,
    LanguageFilter,
    default_lid_model,
    line_hash,
    normalize_for_dedup,
)

ENGLISH = ("The committee met on Tuesday to discuss the new budget for the public library. "
           "Several members argued that the opening hours should be extended during the summer.")
FRENCH = ("Le comité s'est réuni mardi pour discuter du nouveau budget de la bibliothèque municipale. "
          "Plusieurs membres ont soutenu que les horaires d'ouverture devraient être prolongés en été.")


def test_normalize_for_dedup_matches_ccnet_rules():
    assert normalize_for_dedup("  Copyright 2019, ACME Inc.  ") == "copyright 0000 acme inc"
    assert normalize_for_dedup("Call 555-1234!\u200b") == "call 0000000"  # zero-width space is non-printing
    assert normalize_for_dedup("«Élan» — vital") == "élan  vital"
    # the hash is SHA-1's first 8 bytes of the normalised line, so lines differing only in
    # case, digits and punctuation collide on purpose
    assert line_hash("Page 1 of 3.") == hashlib.sha1(b"page 0 of 0").digest()[:8]
    assert line_hash("PAGE 2 OF 7") == line_hash("page 1 of 3.")


def _run(step, docs, rank=0, world_size=1):
    return list(step.run(iter(docs), rank=rank, world_size=world_size))


def test_language_filter_drops_french_keeps_english(tmp_path):
    docs = [Document(text=ENGLISH, id="en"), Document(text=FRENCH, id="fr")]
    step = LanguageFilter(["en"], 0.5, rejects_dir=str(tmp_path), name="cc")
    kept = _run(step, docs)
    assert [d.id for d in kept] == ["en"]
    assert kept[0].metadata["language"] == "en" and kept[0].metadata["language_score"] >= 0.5
    assert step.stats["dropped_language_not_kept"].total == 1
    rejected = [json.loads(line) for line in (tmp_path / "cc" / "language" / "00000.jsonl").read_text().splitlines()]
    assert [(r["id"], r["metadata"]["language"], r["metadata"]["filter_reason"]) for r in rejected] == [
        ("fr", "fr", "language_not_kept")]
    # the config asks for French: the French page is kept, the English one dropped
    kept_fr = _run(LanguageFilter(["fr"], 0.5), [Document(text=ENGLISH, id="en"), Document(text=FRENCH, id="fr")])
    assert [d.id for d in kept_fr] == ["fr"]


def test_language_filter_agrees_with_fasttext_itself():
    model = fasttext.load_model(default_lid_model())
    mixed = "Hello hola bonjour ciao"
    labels, scores = model.predict(mixed, k=1)
    lang, score = LanguageFilter(None, 0.0).predict(mixed + "\n")
    assert (lang, round(score, 5)) == (labels[0].removeprefix("__label__"), round(float(scores[0]), 5))
    # a threshold above the score drops it for low confidence, whatever the language
    step = LanguageFilter(None, min(1.0, score + 0.01))
    assert _run(step, [Document(text=mixed, id="x")]) == []
    assert step.stats["dropped_language_score_below_threshold"].total == 1


def test_exact_dedup_keeps_first_and_partitions_cover_everything():
    texts = ["a", "b", "a", "c", "b", "d", "a"]
    docs = lambda: [Document(text=t, id=str(i)) for i, t in enumerate(texts)]  # noqa: E731
    kept = _run(ExactDedupFilter(), docs())
    assert [d.id for d in kept] == ["0", "1", "3", "5"]
    # three tasks, each reading everything: the union of their outputs is the global dedup
    parts = [_run(ExactDedupFilter(partitioned=True), docs(), rank=r, world_size=3) for r in range(3)]
    assert sorted(d.id for p in parts for d in p) == ["0", "1", "3", "5"]
    assert all("_dedup_digest" not in d.metadata for p in parts for d in p)


def test_jsonl_reader_rejects_bad_lines_alone_and_keeps_a_truncated_files_head(tmp_path):
    import gzip

    from llamalab.data.pipeline.readers import JsonlReader

    good = [json.dumps({"text": f"document {i}", "id": str(i), "url": f"u{i}"}).encode() for i in range(3)]
    lines = [good[0], b'{"text": "caf\xe9"}', b"{oops", b'{"id": "x"}', b'["a list"]', good[1], good[2]]
    (tmp_path / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    whole = gzip.compress(b"".join(json.dumps({"text": f"line {i} " * 20}).encode() + b"\n" for i in range(200)))
    (tmp_path / "b.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    reader = JsonlReader([str(tmp_path)], rejects_dir=str(tmp_path / "rej"), name="src")
    docs = list(reader.run(None, 0, 1))
    a = [d for d in docs if not d.text.startswith("line")]
    assert [(d.id, d.text, d.metadata["url"]) for d in a] == [(str(i), f"document {i}", f"u{i}") for i in range(3)]
    b = [d for d in docs if d.text.startswith("line")]
    assert 0 < len(b) < 200  # the documents before the cut are kept
    assert {k: reader.stats[f"dropped_{k}"].total for k in
            ("bad_encoding", "malformed_json", "no_text", "truncated_or_corrupt_archive")} == {
        "bad_encoding": 1, "malformed_json": 1, "no_text": 2, "truncated_or_corrupt_archive": 1}
    rejects = [json.loads(x) for x in (tmp_path / "rej" / "src" / "reader" / "00000.jsonl").read_text().splitlines()]
    assert [r["id"].rsplit("/", 1)[-1] for r in rejects] == ["a.jsonl:2", "a.jsonl:3", "a.jsonl:4", "a.jsonl:5",
                                                             "b.jsonl.gz"]
