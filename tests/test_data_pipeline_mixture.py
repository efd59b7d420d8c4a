"""The mixture: epochs as whole passes plus a seeded fraction, tokens per source, shards a loader reads."""

from __future__ import annotations

import json
import math
import tomllib

import pytest
import sentencepiece as spm

from llamalab.data import MixtureLoader, read_shard
from llamalab.data.pipeline.config import LLAMA1_EPOCHS, config_from_dict
from llamalab.data.pipeline.mixture import build_mixture, sample_passes
from llamalab.data.pipeline.report import collect_report, format_report


def test_sample_passes_whole_epochs_then_a_seeded_fraction():
    n = 2000
    picks = list(sample_passes(n, 2.5, seed=7, source="books"))
    assert picks[: 2 * n] == [(k, i) for k in range(2) for i in range(n)]
    partial = [i for k, i in picks if k == 2]
    assert abs(len(partial) - n * 0.5) < 4 * math.sqrt(n * 0.25)  # binomial(2000, 0.5) within 4 sigma
    assert partial == sorted(set(partial))
    assert [i for k, i in sample_passes(n, 2.5, seed=7, source="books") if k == 2] == partial  # deterministic
    assert [i for k, i in sample_passes(n, 2.5, seed=8, source="books") if k == 2] != partial
    assert list(sample_passes(5, 0.0, seed=0, source="x")) == []
    with pytest.raises(ValueError, match="epochs -1"):
        list(sample_passes(5, -1, seed=0, source="x"))
    assert LLAMA1_EPOCHS["wikipedia"] == 2.45 and LLAMA1_EPOCHS["books"] == 2.23


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from llamalab.tokenizer import train_sentencepiece

    d = tmp_path_factory.mktemp("mix_tok")
    (d / "corpus.txt").write_text("\n".join(f"document {w} about the river and the town number {i}"
                                            for i, w in enumerate(["alpha", "beta", "gamma", "delta"] * 20)))
    return str(train_sentencepiece([d / "corpus.txt"], d / "tok", vocab_size=300))


def _source(run_dir, name, texts):
    out = run_dir / name / "output"
    out.mkdir(parents=True)
    (out / "00000.jsonl").write_text("".join(json.dumps({"text": t, "id": str(i)}) + "\n" for i, t in enumerate(texts)))


def test_build_mixture_epochs_tokens_and_loader(tmp_path, tokenizer):
    run = tmp_path / "run"
    wiki = [f"wiki document {i} about the river" for i in range(40)]
    books = [f"book {i}: the town and the river, a long story" for i in range(30)]
    _source(run, "wiki", wiki)
    _source(run, "books", books)
    cfg = config_from_dict({"run_dir": str(run), "sources": {"wiki": {"type": "wikipedia", "inputs": "x"},
                                                             "books": {"type": "books", "inputs": "x"}},
                            "mixture": {"tokenizer": tokenizer, "seed": 3, "epochs": {"books": 0.5}}}, "m.toml")
    summary = build_mixture(cfg, progress=False)
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    for name, texts, epochs in (("wiki", wiki, 2.45), ("books", books, 0.5)):
        drawn = [texts[i] for _k, i in sample_passes(len(texts), epochs, seed=3, source=name)]
        entry = summary["sources"][name]
        assert entry["epochs"] == epochs and entry["source_documents"] == len(texts)
        assert entry["documents"] == len(drawn)
        # bos + pieces + eos per document, counted with sentencepiece itself
        assert entry["tokens"] == sum(len(sp.encode(t)) + 2 for t in drawn)
        shards = [read_shard(p) for p in sorted((run / "shards" / name).glob("*.json"))]
        assert sum(s.n_documents for s in shards) == len(drawn)
    assert summary["sources"]["wiki"]["documents"] >= 2 * 40
    # the weights are LLaMA's proportions for the two types, renormalised
    assert summary["sources"]["wiki"]["weight"] == pytest.approx(0.045 / 0.09)
    block = tomllib.loads((run / "mixture.toml").read_text())
    assert block["data"]["sources"]["books"] == {"shards": str(run / "shards" / "books"), "weight": 0.5}
    loader = MixtureLoader({n: (s["shards"], s["weight"]) for n, s in block["data"]["sources"].items()},
                           seq_len=16, batch_size=2, seed=0)
    tokens, _docs = next(iter(loader))
    assert tokens.shape == (2, 17)
    # the report lists tokens per source
    (run / "logs").mkdir()
    table = format_report(collect_report(run))
    assert f"| books | {summary['sources']['books']['documents']:,} | {summary['sources']['books']['tokens']:,} |" in table
    # a second call finds the .done markers and changes nothing
    before = {p: p.read_bytes() for p in (run / "shards").rglob("*.tokens")}
    assert build_mixture(cfg, progress=False) == summary
    assert {p: p.read_bytes() for p in (run / "shards").rglob("*.tokens")} == before


def test_total_tokens_sets_epochs_from_the_proportions(tmp_path, tokenizer):
    run = tmp_path / "run"
    texts = [f"document {i} about the town" for i in range(50)]
    _source(run, "web", texts)
    cfg = config_from_dict({"run_dir": str(run), "sources": {"web": {"type": "commoncrawl", "inputs": "x"}},
                            "mixture": {"tokenizer": tokenizer, "total_tokens": 1000}})
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    size = sum(len(sp.encode(t)) + 2 for t in texts)
    entry = build_mixture(cfg, progress=False)["sources"]["web"]
    assert entry["epochs"] == pytest.approx(1000 / size)
    assert abs(entry["tokens"] - 1000) < 0.25 * 1000
