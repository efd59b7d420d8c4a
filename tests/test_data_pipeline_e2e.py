"""End to end: all seven LLaMA sources on small hand-made inputs -> processed JSONL -> a tokenizer
trained on that output -> the sampled mixture in token shards -> a few pretraining steps on them.

CommonCrawl runs the whole CCNet chain with real models trained here: a SentencePiece model and a
3-gram KenLM (our lmplz build) for the perplexity buckets, and a fastText reference classifier.
"""

from __future__ import annotations

import bz2
import json
import math
import tomllib
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from test_ccnet import ENGLISH

from llamalab.data.pipeline.classifier import train_classifier
from llamalab.data.pipeline.config import SOURCE_TYPES, config_from_dict
from llamalab.data.pipeline.engine import run_config
from llamalab.data.pipeline.kenlm_train import train_kenlm
from llamalab.data.pipeline.mixture import build_mixture
from llamalab.data.pipeline.report import collect_report
from llamalab.tokenizer import train_sentencepiece

SENTENCES = ENGLISH[:10]
SPAM = ["buy cheap watches now best price free shipping click here", "hot deals casino bonus win money fast today",
        "cheap pills discount order now limited offer free gift", "click here to claim your prize best deals now"]
MIT = ("MIT License\n\nCopyright (c) 2024 Example Authors\n\nPermission is hereby granted, free of charge, to any "
       "person obtaining a copy of this software and associated documentation files (the \"Software\"), to deal in "
       "the Software without restriction, including without limitation the rights to use, copy, modify, merge, "
       "publish, distribute...\n\nTHE SOFTWARE IS PROVIDED \"AS IS\", WITHOUT WARRANTY OF ANY KIND.\n")


def _page(k: int) -> str:
    """A CommonCrawl-like English page: the sentences rotated by k (so every page's line differs)."""
    return " ".join(SENTENCES[k:] + SENTENCES[:k])


def _inputs(root: Path) -> dict[str, Path]:
    """Small raw inputs for every source type."""
    d = {t: root / t for t in SOURCE_TYPES}
    for p in d.values():
        p.mkdir(parents=True)
    cc = [{"text": _page(k), "url": f"http://town.example/{k}"} for k in range(8)]
    cc.append({"text": "Le marché ouvre tôt le matin et ferme le soir. " * 8, "url": "http://fr.example/"})
    (d["commoncrawl"] / "cc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in cc))
    c4 = [{"text": "\n".join(SENTENCES[k:k + 5]) + "\nAccept our cookie policy to continue."} for k in range(5)]
    (d["c4"] / "c4.jsonl").write_text("".join(json.dumps(r) + "\n" for r in c4))
    repo = d["github"] / "townlib"
    repo.mkdir()
    (repo / "LICENSE").write_text(MIT)
    (repo / "market.py").write_text('"""Opening hours of the town market."""\n\n\ndef is_open(hour: int) -> bool:\n'
                                    '    """Whether the market is open at this hour."""\n    return 6 <= hour < 20\n')
    (repo / "bridge.py").write_text('"""The old stone bridge."""\n\nBUILT = 1820\n\n\ndef age(year: int) -> int:\n'
                                    '    """Years since the bridge was built."""\n    return year - BUILT\n')
    article = ("'''Rivertown''' is a [[town]] on the [[River Example|river]].<ref>Atlas</ref>\n\n"
               "== History ==\nThe {{convert|200|m}} bridge was built in 1820. " + " ".join(SENTENCES[:4]))
    dump = ('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" xml:lang="en"><siteinfo><sitename>Wikipedia'
            '</sitename><dbname>enwiki</dbname><namespaces><namespace key="0" case="first-letter" /></namespaces>'
            f'</siteinfo><page><title>Rivertown</title><ns>0</ns><id>1</id><revision><id>10</id>'
            f'<text xml:space="preserve">{escape(article)}</text></revision></page></mediawiki>')
    (d["wikipedia"] / "enwiki-pages-articles.xml.bz2").write_bytes(bz2.compress(dump.encode()))
    lake = ["A ferry crosses the lake at noon.", "Fishermen mend their nets on the pier.",
            "Snow covers the mountains until late spring.", "The lighthouse keeper writes letters every night."]
    for i, (title, text) in enumerate([("The River Book", SENTENCES), ("The Lake Book", lake)]):
        body = "\n\n".join(" ".join(text[j % len(text):] + text[:j % len(text)]) for j in range(6))
        (d["books"] / f"book{i}.txt").write_text(
            f"The Project Gutenberg eBook of {title}\n*** START OF THE PROJECT GUTENBERG EBOOK {title.upper()} ***\n"
            f"{body}\n*** END OF THE PROJECT GUTENBERG EBOOK {title.upper()} ***\nLicence text.\n")
    (d["arxiv"] / "paper.tex").write_text(
        "\\documentclass{article}\n\\newcommand{\\town}{Rivertown}\n\\begin{document}\n\\title{Bridges}\n"
        "\\section{Introduction}\nWe study the bridge of \\town. % a comment\n" + " ".join(SENTENCES[6:]) +
        "\n\\section{Results}\nThe bridge of \\town{} is old.\n\\bibliography{refs}\n\\end{document}\n")
    site = d["stackexchange"] / "travel.stackexchange.com"
    site.mkdir()
    rows = [dict(Id="1", PostTypeId="1", Score="3", Title="When does the Rivertown market open?",
                 Body="<p>I want to buy <b>bread</b> there.</p>"),
            dict(Id="2", PostTypeId="2", ParentId="1", Score="9", Body="<p>Early in the morning.</p>"),
            dict(Id="3", PostTypeId="2", ParentId="1", Score="10", Body="<p>At six, every day but Sunday.</p>")]
    (site / "Posts.xml").write_text('<?xml version="1.0" encoding="utf-8"?>\n<posts>\n' + "\n".join(
        "  <row " + " ".join(f"{k}={quoteattr(v)}" for k, v in r.items()) + " />" for r in rows) + "\n</posts>\n")
    return d


def test_seven_sources_to_shards_to_training_steps(tmp_path):
    from llamalab.train.config import load_config
    from llamalab.train.loop import train

    inputs = _inputs(tmp_path / "raw")
    models = tmp_path / "models"
    models.mkdir()
    (models / "english.txt").write_text("\n".join(_page(k) for k in range(10)) + "\n")
    sp = train_sentencepiece([models / "english.txt"], models / "sp", vocab_size=300, byte_fallback=False,
                             hard_vocab_limit=False)
    lm = train_kenlm([str(models / "english.txt")], str(sp), models / "en.3gram.bin", order=3)
    (models / "ref.txt").write_text("\n".join(_page(k) for k in range(10)) + "\n")
    (models / "random.txt").write_text("\n".join(f"{s} {i}" for i in range(5) for s in SPAM) + "\n")
    for name in ("ref", "random"):  # one document per line for the classifier
        lines = (models / f"{name}.txt").read_text().splitlines()
        (models / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    train_classifier([str(models / "ref.jsonl")], [str(models / "random.jsonl")], models / "ref.bin", epoch=20)

    sources = {t: {"type": t, "inputs": [str(p)]} for t, p in inputs.items()}
    sources["commoncrawl"]["options"] = {"kenlm_model": str(lm), "sentencepiece_model": str(sp),
                                         "classifier_model": str(models / "ref.bin")}
    run = tmp_path / "run"
    cfg = config_from_dict({"name": "e2e", "run_dir": str(run), "executor": {"tasks": 2, "workers": 1},
                            "sources": sources,
                            # GitHub's 0.64 epochs of 2 files could draw none: one whole pass more here
                            "mixture": {"seed": 1, "epochs": {"github": 1.64}}}, "e2e.toml")
    outputs = run_config(cfg, progress=False)
    docs = {t: [json.loads(line) for p in sorted(Path(outputs[t]).glob("*.jsonl")) for line in p.open()]
            for t in SOURCE_TYPES}
    assert all(docs[t] for t in SOURCE_TYPES), {t: len(v) for t, v in docs.items()}
    cc = docs["commoncrawl"]
    assert len(cc) == 8 and all(d["metadata"]["perplexity_bucket"] in ("head", "middle") for d in cc)
    assert all(d["metadata"]["reference_score"] >= 0.25 and d["metadata"]["language"] == "en" for d in cc)
    assert not any("cookie" in d["text"] for d in docs["c4"])
    assert [d["metadata"]["license"] for d in docs["github"]] == ["MIT", "MIT"]
    assert "Rivertown" in docs["wikipedia"][0]["text"] and "[[" not in docs["wikipedia"][0]["text"]
    assert "Rivertown" in docs["arxiv"][0]["text"] and "% a comment" not in docs["arxiv"][0]["text"]
    se = docs["stackexchange"][0]["text"]
    assert se.index("At six") < se.index("Early in the morning")  # score 10 before 9
    assert len(docs["books"]) == 2 and "Licence text" not in docs["books"][0]["text"]
    report = collect_report(run)
    assert {r["source"] for r in report["steps"]} == set(SOURCE_TYPES) and not report["incomplete_tasks"]
    fr = [r for r in report["steps"] if r["source"] == "commoncrawl" and "Language" in r["step"]][0]
    assert fr["reasons"] == {"language_not_kept": 1}

    # `llamalab tokenizer train` reads the pipeline's output directly
    tok = train_sentencepiece(sorted(str(p) for t in SOURCE_TYPES for p in Path(outputs[t]).glob("*.jsonl")),
                              tmp_path / "tok" / "tok", vocab_size=400)
    cfg.mixture.tokenizer = str(tok)
    summary = build_mixture(cfg, progress=False)
    for t in SOURCE_TYPES:
        entry = summary["sources"][t]
        assert entry["tokens"] > 0
        # whole epochs are exact; the fraction is a seeded draw per document
        assert math.floor(entry["epochs"]) * len(docs[t]) <= entry["documents"] <= math.ceil(entry["epochs"]) * len(
            docs[t])
    block = tomllib.loads((run / "mixture.toml").read_text())
    assert set(block["data"]["sources"]) == set(SOURCE_TYPES)

    sources_toml = "\n".join(f'[data.sources.{n}]\nshards = "{s["shards"]}"\nweight = {s["weight"]}'
                             for n, s in block["data"]["sources"].items())
    pretrain = tmp_path / "pretrain.toml"
    pretrain.write_text(f"""run_dir = "{tmp_path / 'train'}"
seed = 1
[model]
preset = "tiny"
overrides = {{ vocab_size = 400, max_seq_len = 32 }}
[data]
val_shards = "{run / 'shards' / 'wikipedia'}"
{sources_toml}
[train]
total_steps = 4
global_batch_tokens = 128
seq_len = 16
micro_batch_size = 8
precision = "fp32"
[optim]
lr = 1e-3
warmup_steps = 1
[eval]
every = 4
batches = 1
[checkpoint]
every = 4
""")
    result = train(load_config(pretrain), progress=False)
    assert result["status"] == "completed" and result["steps"] == 4 and math.isfinite(result["val_loss"])
