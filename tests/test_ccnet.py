"""CCNet steps for CommonCrawl, on hand-made pages whose right answer is evident.

The KenLM model is a real 3-gram trained with our lmplz build (``make lmplz``) on a few KB of
English over SentencePiece pieces from `llamalab.tokenizer.train_sentencepiece`; perplexities are
checked against KenLM's own ``Model.perplexity``.
"""

from __future__ import annotations

import gzip
import io
import json
import math

import kenlm
import numpy as np
import pytest
import sentencepiece as spm
from datatrove.data import Document

from llamalab.data.pipeline.classifier import reference_probability, train_classifier
from llamalab.data.pipeline.commoncrawl import (
    DEFAULTS,
    LineDedupFilter,
    MinLengthFilter,
    PerplexityFilter,
    ReferenceClassifierFilter,
    build_steps,
    document_perplexity,
    normalize_for_lm,
)
from llamalab.data.pipeline.common import load_fasttext
from llamalab.data.pipeline.kenlm_train import train_kenlm

ENGLISH = [
    "The river runs through the old town and past the market square.",
    "Children walk to school along the river every morning.",
    "The market opens early and closes when the sun goes down.",
    "Farmers bring bread, cheese and apples to the market square.",
    "In the evening the old town is quiet and the streets are empty.",
    "The school stands next to the church on the hill above the river.",
    "Every summer the town holds a festival with music and dancing.",
    "Visitors come from the nearby villages to see the festival.",
    "The bridge over the river was built more than two hundred years ago.",
    "People say the bridge is the oldest stone bridge in the region.",
    "The library in the town hall lends books to children and adults.",
    "On Sundays families walk along the river and eat in the park.",
]


def _run(step, docs, rank=0, world_size=1):
    return list(step.run(iter(docs), rank=rank, world_size=world_size))


def test_line_dedup_keeps_first_footer_only(tmp_path):
    footer = "Copyright 2021 Example News. All rights reserved."
    pages = [Document(text=f"{body}\n\n{footer.replace('2021', str(2021 + i))}", id=str(i))
             for i, body in enumerate(ENGLISH[:3])]
    pages.append(Document(text=footer.upper(), id="only-footer"))
    step = LineDedupFilter(rejects_dir=str(tmp_path), name="cc")
    kept = _run(step, pages)
    # normalisation maps the years to 0000 and drops case and punctuation: one footer in all
    assert [d.text for d in kept] == [f"{ENGLISH[0]}\n\n{footer}", ENGLISH[1], ENGLISH[2]]
    assert step.stats["lines_removed"].total == 3
    assert step.stats["dropped_all_lines_duplicated"].total == 1
    rejected = json.loads((tmp_path / "cc" / "line_dedup" / "00000.jsonl").read_text())
    assert rejected["id"] == "only-footer" and rejected["metadata"]["filter_reason"] == "all_lines_duplicated"
    # a new task starts with an empty hash set (a task is CCNet's shard group)
    again = _run(step, [Document(text=footer, id="x")])
    assert [d.text for d in again] == [footer]


def test_min_length_300_characters():
    step = MinLengthFilter(DEFAULTS["min_length"])
    docs = [Document(text="a" * 299, id="short"), Document(text="a" * 300, id="ok")]
    assert [d.id for d in _run(step, docs)] == ["ok"]
    assert step.stats["dropped_too_short"].total == 1


def test_normalize_for_lm():
    assert normalize_for_lm("  Café “Olé” — 2024!  ") == 'cafe "ole"  -  0000!'


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A SentencePiece model and a 3-gram KenLM over its pieces, trained on the English lines."""
    from llamalab.tokenizer import train_sentencepiece

    d = tmp_path_factory.mktemp("ccnet_models")
    corpus = d / "english.txt"
    corpus.write_text("\n".join(ENGLISH * 3) + "\n", encoding="utf-8")
    sp_path = train_sentencepiece([corpus], d / "sp", vocab_size=300, byte_fallback=False, hard_vocab_limit=False)
    lm_path = train_kenlm([str(corpus)], str(sp_path), d / "en.3gram.arpa", order=3, binary=False)
    return str(sp_path), str(lm_path)


def test_train_kenlm_writes_an_arpa_kenlm_reads(models):
    sp_path, lm_path = models
    text = open(lm_path, encoding="utf-8").read()
    assert text.startswith("\n\\data\\") or text.lstrip().startswith("\\data\\")
    assert "ngram 3=" in text
    assert kenlm.Model(lm_path).order == 3


def test_document_perplexity_matches_kenlm(models):
    sp_path, lm_path = models
    lm, sp = kenlm.Model(lm_path), spm.SentencePieceProcessor(model_file=sp_path)
    line = "The children walk along the river to the market."
    pieces = " ".join(sp.encode(normalize_for_lm(line), out_type=str))
    # one line: KenLM's own perplexity (10^(-log10 p / (words + 1)), </s> counted)
    assert document_perplexity(line, lm, sp) == pytest.approx(round(lm.perplexity(pieces), 1), abs=0.051)
    # two lines: the log probabilities and the lengths add up before the power
    other = "Visitors come to the festival."
    p2 = " ".join(sp.encode(normalize_for_lm(other), out_type=str))
    n = len(pieces.split()) + 1 + len(p2.split()) + 1
    expected = 10 ** (-(lm.score(pieces) + lm.score(p2)) / n)
    assert document_perplexity(f"{line}\n\n{other}", lm, sp) == pytest.approx(expected, abs=0.051)


def test_perplexity_buckets_keep_head_and_middle(models, tmp_path):
    sp_path, lm_path = models
    docs = [Document(text=ENGLISH[0], id="seen"), Document(text="The library opens on Sundays.", id="close"),
            Document(text="Zxq vbnm qwrtz plkj hgfd xcvb.", id="noise")]
    step = PerplexityFilter(lm_path, sp_path, rejects_dir=str(tmp_path), name="cc")
    ppl = {d.id: step.perplexity(d.text) for d in docs}
    assert ppl["seen"] < ppl["close"] < ppl["noise"]
    # cutoffs between the three: one document per bucket, the tail dropped
    cuts = ((ppl["seen"] + ppl["close"]) / 2, (ppl["close"] + ppl["noise"]) / 2)
    step = PerplexityFilter(lm_path, sp_path, cutoffs=cuts, rejects_dir=str(tmp_path), name="cc")
    kept = _run(step, docs)
    assert [(d.id, d.metadata["perplexity_bucket"]) for d in kept] == [("seen", "head"), ("close", "middle")]
    assert step.stats["dropped_perplexity_tail"].total == 1
    rejected = json.loads((tmp_path / "cc" / "perplexity" / "00000.jsonl").read_text())
    assert rejected["id"] == "noise" and rejected["metadata"]["perplexity"] == ppl["noise"]
    # the percentile option: the head is what lies under the 30th percentile of the task's own scores
    many = [Document(text=" ".join(ENGLISH[i:i + 2]) if i < 6 else f"qz{i} xv{i} wk{i}", id=str(i)) for i in range(10)]
    step = PerplexityFilter(lm_path, sp_path, percentiles=True, keep_buckets=("head",))
    scores = {d.id: step.perplexity(d.text) for d in many}
    p30 = np.percentile(list(scores.values()), 30)
    kept = _run(step, many)
    assert [d.id for d in kept] == [i for i, s in scores.items() if s < p30] and 2 <= len(kept) <= 3


def test_reference_classifier(tmp_path):
    science = ["the study measured the effect of temperature on enzyme activity in controlled experiments",
               "researchers published the results in a peer reviewed journal with detailed methods",
               "the historical archive documents the treaty negotiations between the two governments",
               "the university report analyses population data collected over three decades"]
    spam = ["buy cheap watches now best price free shipping click here",
            "hot deals casino bonus win money fast click the link today",
            "cheap pills discount order now limited offer free gift",
            "click here to claim your prize best deals cheap price now"]
    ref, rnd = tmp_path / "ref.jsonl", tmp_path / "rnd.jsonl"
    ref.write_text("".join(json.dumps({"text": f"{s} {i}"}) + "\n" for i in range(30) for s in science))
    rnd.write_text("".join(json.dumps({"text": f"{s} {i}"}) + "\n" for i in range(30) for s in spam))
    report = train_classifier([str(ref)], [str(rnd)], tmp_path / "ref.bin", epoch=10, heldout=0.2)
    assert report.n_reference == report.n_random == 120
    assert report.heldout_accuracy == 1.0
    model = load_fasttext(str(tmp_path / "ref.bin"))
    assert reference_probability(model, "the journal published a study of the archive data") > 0.5
    step = ReferenceClassifierFilter(str(tmp_path / "ref.bin"), DEFAULTS["classifier_threshold"])
    kept = _run(step, [Document(text="researchers analysed the treaty archive", id="r"),
                       Document(text="click here for cheap casino bonus", id="s")])
    assert [d.id for d in kept] == ["r"] and kept[0].metadata["reference_score"] >= 0.25
    assert step.stats["dropped_reference_score_below_threshold"].total == 1


def _wet(records: list[tuple[str, str]]) -> bytes:
    """A gzipped WET file with one conversion record per (url, text)."""
    from warcio.statusandheaders import StatusAndHeaders  # noqa: F401 - warcio's record builder needs it
    from warcio.warcwriter import WARCWriter

    buf = io.BytesIO()
    writer = WARCWriter(buf, gzip=True)
    for url, text in records:
        rec = writer.create_warc_record(url, "conversion", payload=io.BytesIO(text.encode("utf-8")),
                                        warc_content_type="text/plain")
        writer.write_record(rec)
    return buf.getvalue()


def test_build_steps_on_wet_files_with_a_truncated_one(tmp_path, models):
    sp_path, lm_path = models
    footer = "Subscribe to our newsletter for 2 free issues!"
    english = " ".join(ENGLISH[:5])
    french = ("Le marché ouvre tôt le matin et ferme quand le soleil se couche. Les enfants marchent le long de "
              "la rivière pour aller à l'école, et les visiteurs viennent des villages voisins pour la fête. "
              "Le pont de pierre sur la rivière a été construit il y a plus de deux cents ans, et la bibliothèque "
              "de la mairie prête des livres aux enfants comme aux adultes.")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.warc.wet.gz").write_bytes(_wet([
        ("http://a.example/1", f"{english}\n{footer}"),
        ("http://a.example/2", f"{french}\n{footer}"),
        ("http://a.example/3", "Too short to keep."),
    ]))
    whole = _wet([("http://b.example/1", " ".join(ENGLISH[5:]))] * 3)
    (tmp_path / "in" / "b.warc.wet.gz").write_bytes(whole[: len(whole) * 5 // 6])  # cut mid-stream
    steps = build_steps([str(tmp_path / "in")], {"classifier": False, "kenlm_model": lm_path,
                                                  "sentencepiece_model": sp_path, "perplexity_cutoffs": [1e6, 1e7]},
                        rejects_dir=str(tmp_path / "rej"), name="cc")
    data = None
    for step in steps:
        data = step.run(data, 0, 1)
    kept = list(data)
    # b's second copy repeats every line of its first: line dedup drops it whole
    assert [d.metadata["url"] for d in kept] == ["http://a.example/1", "http://b.example/1"]
    assert kept[0].text == f"{english}\n{footer}" and kept[0].metadata["language"] == "en"
    reader, dedup, length, lang, ppl = steps
    assert reader.stats["dropped_truncated_or_corrupt_archive"].total == 1
    assert length.stats["dropped_too_short"].total == 1  # the French footer went in line dedup
    assert lang.stats["dropped_language_not_kept"].total == 1
    assert dedup.stats["lines_removed"].total == 1 + 1  # footer of page 2, the repeated b.example page
    assert dedup.stats["dropped_all_lines_duplicated"].total == 1
    assert ppl.stats["bucket_head"].total == 2
    rejects = tmp_path / "rej" / "cc" / "reader" / "00000.jsonl"
    assert "b.warc.wet.gz" in rejects.read_text()


def test_build_steps_rejects_unknown_and_missing_options(tmp_path):
    (tmp_path / "x.jsonl").write_text(json.dumps({"text": "hi"}) + "\n")
    with pytest.raises(ValueError, match="unknown option.*min_lenght"):
        build_steps([str(tmp_path)], {"min_lenght": 3}, rejects_dir=None, name="cc")
    with pytest.raises(ValueError, match="kenlm_model is empty"):
        build_steps([str(tmp_path)], {}, rejects_dir=None, name="cc")
    steps = build_steps([str(tmp_path)], {"perplexity": False, "classifier": False}, rejects_dir=None, name="cc")
    assert [type(s).__name__ for s in steps] == ["CommonCrawlReader", "LineDedupFilter", "MinLengthFilter",
                                                  "LanguageFilter"]
    assert math.isfinite(DEFAULTS["language_threshold"]) and gzip  # the defaults are the paper's
    assert DEFAULTS["perplexity_cutoffs"] == [340.0, 520.0] and DEFAULTS["classifier_threshold"] == 0.25


def test_warc_response_html_becomes_text_and_bad_bytes_are_rejected(tmp_path):
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    from llamalab.data.pipeline.readers import WarcReader, html_to_text

    html = ("<html><head><title>T</title><script>var x = 1;</script></head><body><h1>Market day</h1>"
            "<p>The market opens <b>early</b>.</p><ul><li>bread</li><li>apples</li></ul></body></html>")
    buf = io.BytesIO()
    writer = WARCWriter(buf, gzip=True)
    for url, ctype, body in [("http://m.example/", "text/html; charset=utf-8", html.encode()),
                             ("http://m.example/logo.png", "image/png", b"\x89PNG....")]:
        headers = StatusAndHeaders("200 OK", [("Content-Type", ctype)], protocol="HTTP/1.1")
        writer.write_record(writer.create_warc_record(url, "response", payload=io.BytesIO(body),
                                                      http_headers=headers))
    writer.write_record(writer.create_warc_record("http://bad.example/", "conversion",
                                                  payload=io.BytesIO(b"caf\xe9 latin-1 text"),
                                                  warc_content_type="text/plain"))
    (tmp_path / "x.warc.gz").write_bytes(buf.getvalue())
    reader = WarcReader([str(tmp_path)], rejects_dir=str(tmp_path / "rej"), name="cc")
    docs = list(reader.run(None, 0, 1))
    # the HTML page only (the image is not text); inscriptis lays it out, the script is gone
    assert [d.metadata["url"] for d in docs] == ["http://m.example/"]
    assert docs[0].text == html_to_text(html) and "var x" not in docs[0].text
    assert "Market day" in docs[0].text and "* bread" in docs[0].text
    assert reader.stats["dropped_bad_encoding"].total == 1
    rejected = json.loads((tmp_path / "rej" / "cc" / "reader" / "00000.jsonl").read_text())
    assert rejected["metadata"]["url"] == "http://bad.example/"


def test_cli_train_kenlm_and_train_classifier(tmp_path, models, capsys):
    from llamalab.cli import main

    sp_path, _ = models
    corpus = tmp_path / "en.jsonl"
    corpus.write_text("".join(json.dumps({"text": s}) + "\n" for s in ENGLISH))
    assert main(["data", "train-kenlm", str(corpus), "--sentencepiece", sp_path, "--out", str(tmp_path / "lm.bin"),
                 "--order", "3"]) == 0
    lm = kenlm.Model(str(tmp_path / "lm.bin"))
    assert lm.order == 3 and "wrote" in capsys.readouterr().err
    assert main(["data", "train-classifier", "--reference", str(corpus), "--random", str(tmp_path / "none.jsonl"),
                 "--out", str(tmp_path / "c.bin")]) == 2
    assert "none.jsonl" in capsys.readouterr().err
