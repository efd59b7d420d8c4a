"""Tokenized data: the shard format, tokenize_files, MixtureLoader and eval_batches.

References: the sentencepiece library's own encode (shard contents), numpy slices of the raw
token files (windows), bos positions (document ids), binomial statistics (mixture weights) and
an uninterrupted run (resumption).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from llamalab.data import (
    LLAMA1_MIXTURE,
    DataError,
    MixtureLoader,
    ShardWriter,
    dtype_for_vocab,
    eval_batches,
    find_shards,
    mixture_sources,
    read_shard,
    tokenize_files,
)
from llamalab.data.cli import add_tokenize_parser
from llamalab.data.loader import feistel_permute
from llamalab.tokenizer import load_tokenizer, train_sentencepiece

WORDS = ("the of and to in is was for that with as on by at from his her they this which be have are not had "
         "it an were or but its one all their been has more when who would she there can them than into other "
         "after first new some these two time only may over most also many such where during later three").split()


def _doc(rng: random.Random) -> str:
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40))).capitalize() + "."
    if rng.random() < 0.3:
        text += f" In {rng.randint(1800, 2030)} it cost {rng.randint(0, 9999)} dollars."
    if rng.random() < 0.1:
        text += "\nSecond line: café 中文 €."  # € is not in the corpus: byte fallback
    return text


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    rng = random.Random(0)
    root = tmp_path_factory.mktemp("corpus")
    jsonl_docs = [_doc(rng) for _ in range(300)]
    lines = [_doc(rng).replace("\n", " ") for _ in range(40)]
    whole = "A whole file is one document.\n\nIt keeps its blank lines.\n"
    jsonl, lines_txt, whole_txt = root / "web.jsonl", root / "lines.txt", root / "whole.txt"
    with jsonl.open("w", encoding="utf-8") as f:
        for i, d in enumerate(jsonl_docs):
            f.write(json.dumps({"text": d, "id": i}) + "\n")
            if i == 5:
                f.write("\n")  # blank lines are skipped
    lines_txt.write_text("\n".join(lines[:20]) + "\n\n" + "\n".join(lines[20:]) + "\n", encoding="utf-8")
    whole_txt.write_text(whole, encoding="utf-8")
    return {"jsonl": jsonl, "lines": lines_txt, "whole": whole_txt,
            "jsonl_docs": jsonl_docs, "line_docs": lines, "whole_doc": whole}


@pytest.fixture(scope="module")
def sp_model(corpus: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_sentencepiece([corpus["jsonl"]], tmp_path_factory.mktemp("sp") / "tok", vocab_size=400)


@pytest.fixture(scope="module")
def sp_ref(sp_model: Path):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(sp_model))


def _write(out: Path, docs: list[list[int]], vocab_size: int = 1000, shard_tokens: int = 1 << 20,
           prefix: str = "shard") -> list[Path]:
    identity = {"name": "synthetic", "sha256": None, "vocab_size": vocab_size, "bos_id": 1, "eos_id": 2}
    with ShardWriter(out, identity=identity, shard_tokens=shard_tokens, prefix=prefix) as w:
        for d in docs:
            w.add_document(d, source="synthetic")
    return w.paths


def _source_docs(rng: np.random.Generator, lo: int, hi: int, n_docs: int) -> list[list[int]]:
    """Documents bos ... eos whose body ids lie in [lo, hi), so a token tells its source."""
    return [[1, *rng.integers(lo, hi, size=int(rng.integers(1, 60))).tolist(), 2] for _ in range(n_docs)]


@pytest.fixture(scope="module")
def mixture(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[list[Path], float]]:
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("mix")
    spec = {"web": (10, 300, 400, 0.6), "code": (300, 600, 150, 0.3), "wiki": (600, 900, 60, 0.1)}
    sources = {}
    for name, (lo, hi, n_docs, weight) in spec.items():
        _write(root / name, _source_docs(rng, lo, hi, n_docs), shard_tokens=2000)
        sources[name] = ([root / name], weight)
    return sources


def _concat(paths: list[Path]) -> np.ndarray:
    return np.concatenate([np.fromfile(read_shard(p).path.with_suffix(".tokens"), dtype=read_shard(p).tokens.dtype)
                           for p in find_shards(paths)]).astype(np.int64)


# ------------------------------------------------------------------------------------------
# The shard format and tokenize_files
# ------------------------------------------------------------------------------------------


def test_tokenize_files_round_trip(corpus: dict, sp_model: Path, sp_ref, tmp_path: Path) -> None:
    out = tmp_path / "tokens"
    inputs = [corpus["jsonl"], corpus["whole"]]
    paths = tokenize_files(inputs, sp_model, out, shard_tokens=1500, progress=False)
    expected = [[sp_ref.bos_id(), *sp_ref.encode(d), sp_ref.eos_id()]
                for d in [*corpus["jsonl_docs"], corpus["whole_doc"]]]
    assert len(paths) > 3 and paths == find_shards(out)
    got, sources = [], set()
    for p in paths:
        shard = read_shard(p, check_ids=True)
        assert shard.tokens.dtype == np.uint16 and shard.meta["dtype"] == "uint16"
        assert shard.n_tokens == int(shard.docs[-1]) == shard.meta["n_tokens"]
        assert shard.meta["tokenizer"]["vocab_size"] == 400 and shard.meta["bos"] and shard.meta["eos"]
        assert shard.meta["tokenizer"]["sha256"] == hashlib.sha256(sp_model.read_bytes()).hexdigest()
        assert shard.n_tokens >= 1500 or p == paths[-1]  # whole documents; roll after 1500 tokens
        sources.update(shard.meta["sources"])
        raw = np.fromfile(p.with_suffix(".tokens"), dtype="<u2")  # the file alone, without our reader
        got.extend(raw[a:b].tolist() for a, b in zip(shard.docs[:-1], shard.docs[1:]))
        assert [shard.document(i).tolist() for i in range(shard.n_documents)] == got[-shard.n_documents:]
    assert got == expected
    assert sources == {str(corpus["jsonl"]), str(corpus["whole"])}
    assert not list(out.glob(".*"))  # no temporary files left behind

    # --split-lines: every non-empty line of a .txt is a document; workers give identical shards.
    lines = tokenize_files([corpus["lines"]], load_tokenizer(sp_model), tmp_path / "lines", progress=False,
                           split_lines=True, num_workers=2)
    shard = read_shard(lines[0])
    assert [shard.document(i).tolist() for i in range(shard.n_documents)] == [
        [1, *sp_ref.encode(d), 2] for d in corpus["line_docs"]]
    with pytest.raises(DataError, match="already holds"):
        tokenize_files(inputs, sp_model, out, progress=False)


def test_tokenize_files_bad_input(corpus: dict, sp_model: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "broken\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{bad}:2: not valid JSON"):
        tokenize_files([bad], sp_model, tmp_path / "o1", progress=False)
    assert not find_shards_or_none(tmp_path / "o1")  # nothing sealed, no temporary files
    bad.write_text('{"text": "fine"}\n{"body": "no text"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{bad}:2: expected a string 'text' field"):
        tokenize_files([bad], sp_model, tmp_path / "o2", progress=False)
    body = tmp_path / "body.jsonl"
    body.write_text('{"body": "one"}\n{"body": "two"}\n', encoding="utf-8")
    assert len(tokenize_files([body], sp_model, tmp_path / "o3", text_field="body", progress=False,
                              shard_tokens=1)) == 2
    with pytest.raises(DataError, match="missing.jsonl: no such file"):
        tokenize_files([tmp_path / "missing.jsonl"], sp_model, tmp_path / "o4", progress=False)
    csv = tmp_path / "x.csv"
    csv.write_text("a,b\n")
    with pytest.raises(DataError, match="x.csv: unsupported input"):
        tokenize_files([csv], sp_model, tmp_path / "o5", progress=False)


def find_shards_or_none(path: Path) -> list[Path]:
    return list(path.iterdir()) if path.exists() else []


@pytest.mark.parametrize(("vocab_size", "dtype", "top_id"), [(65536, "<u2", 65535), (65537, "<u4", 65536),
                                                             (128256, "<u4", 128255)])
def test_dtype_by_vocab_size(tmp_path: Path, vocab_size: int, dtype: str, top_id: int) -> None:
    assert dtype_for_vocab(vocab_size) == np.dtype(dtype)
    docs = [[1, top_id, 5, 2], [1, 0, 2]]
    (path,) = _write(tmp_path, docs, vocab_size=vocab_size)
    shard = read_shard(path, check_ids=True)
    assert shard.tokens.dtype == np.dtype(dtype)
    assert path.with_suffix(".tokens").stat().st_size == 7 * np.dtype(dtype).itemsize
    assert np.fromfile(path.with_suffix(".tokens"), dtype=dtype).tolist() == [1, top_id, 5, 2, 1, 0, 2]
    assert np.load(path.with_name("shard-00000.docs.npy")).tolist() == [0, 4, 7]
    with pytest.raises(DataError, match=f"token id {vocab_size} is outside the vocabulary"):
        _write(tmp_path / "over", [[1, vocab_size, 2]], vocab_size=vocab_size)


def _corrupt_meta(key: str, value: object):  # noqa: ANN202
    def edit(tokens: Path, docs: Path, meta: Path) -> None:
        data = json.loads(meta.read_text())
        data[key] = value
        meta.write_text(json.dumps(data))
    return edit


CORRUPTIONS = {
    "truncated tokens": (lambda t, d, m: t.write_bytes(t.read_bytes()[:-2]), "tokens", "bytes; expected"),
    "missing tokens": (lambda t, d, m: t.unlink(), "tokens", "no such file"),
    "missing docs": (lambda t, d, m: d.unlink(), "docs.npy", "no such file"),
    "garbage docs": (lambda t, d, m: d.write_bytes(b"not numpy"), "docs.npy", "not a readable .npy"),
    "float docs": (lambda t, d, m: np.save(d, np.load(d).astype(np.float64)), "docs.npy", "expected a 1-D int64"),
    "docs count": (lambda t, d, m: np.save(d, np.load(d)[:-1]), "docs.npy", "offsets; expected n_documents"),
    "docs end": (lambda t, d, m: np.save(d, np.array([0, 3, 6], dtype=np.int64)), "docs.npy", "expected 0 to n_tokens"),
    "bad json": (lambda t, d, m: m.write_text("{oops"), "json", "not valid JSON"),
    "format": (_corrupt_meta("format", "nanogpt"), "json", "expected 'llamalab.tokens'"),
    "version": (_corrupt_meta("version", 99), "json", "format version 99"),
    "dtype": (_corrupt_meta("dtype", "uint32"), "json", "expected 'uint16' for vocab_size 1000"),
    "n_tokens": (_corrupt_meta("n_tokens", 8), "tokens", r"expected 16 \(8 uint16 tokens"),
    "n_documents": (_corrupt_meta("n_documents", -1), "json", "n_documents is -1"),
    "missing meta": (lambda t, d, m: m.unlink(), "json", "no such file"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_read_shard_errors_name_the_file(tmp_path: Path, case: str) -> None:
    (path,) = _write(tmp_path, [[1, 5, 6, 2], [1, 7, 8, 9, 2]])
    read_shard(path)
    edit, suffix, message = CORRUPTIONS[case]
    files = {"tokens": path.with_suffix(".tokens"), "docs.npy": path.with_name("shard-00000.docs.npy"),
             "json": path}
    edit(files["tokens"], files["docs.npy"], files["json"])
    with pytest.raises(DataError, match=message) as info:
        read_shard(path)
    assert str(info.value).startswith(str(files[suffix]) + ":")


def test_read_shard_checks_ids(tmp_path: Path) -> None:
    (path,) = _write(tmp_path, [[1, 5, 999, 2]])
    np.array([1, 5, 1000, 2], dtype="<u2").tofile(path.with_suffix(".tokens"))  # same size, bad id
    read_shard(path)  # sizes agree: only the id check can tell
    with pytest.raises(DataError, match="token id 1000 is outside the vocabulary"):
        read_shard(path, check_ids=True)


# ------------------------------------------------------------------------------------------
# MixtureLoader
# ------------------------------------------------------------------------------------------


def _source_of_rows(tokens: torch.Tensor) -> list[str]:
    """Which synthetic source each row came from, told by its body ids (bos/eos are shared)."""
    out = []
    for row in tokens:
        body = row[row > 2]
        assert body.numel()
        lo, hi = int(body.min()), int(body.max())
        kind = next(name for name, (a, b) in {"web": (10, 300), "code": (300, 600), "wiki": (600, 900)}.items()
                    if a <= lo and hi < b)
        out.append(kind)
    return out


def test_mixture_frequencies_match_weights(mixture: dict) -> None:
    loader = MixtureLoader(mixture, seq_len=16, batch_size=16, seed=3)
    rows = [name for _ in range(150) for name in _source_of_rows(next(loader)[0])]
    n = len(rows)
    for name, (_, weight) in mixture.items():
        count = rows.count(name)
        sd = math.sqrt(n * weight * (1 - weight))
        assert abs(count - n * weight) < 4 * sd, (name, count, n * weight, sd)
    # Many more draws through the (pure) source choice: chi-square with 2 dof, p ~ 1e-6 cutoff.
    big = np.bincount(loader.source_of(np.arange(200_000, dtype=np.uint64)), minlength=3)
    expected = 200_000 * loader.weights
    assert float(((big - expected) ** 2 / expected).sum()) < 28.0
    assert math.isclose(sum(LLAMA1_MIXTURE.values()), 1.0)


def test_windows_come_from_the_stream_and_epochs_cover_it(mixture: dict) -> None:
    seq_len = 16
    paths, _ = mixture["wiki"]
    loader = MixtureLoader({"wiki": (paths, 1.0)}, seq_len=seq_len, batch_size=8, seed=1)
    stream = _concat(paths)
    n_windows = (len(stream) - 1) // seq_len
    assert loader.n_windows == [n_windows]
    starts: list[int] = []
    windows = {stream[i * seq_len: i * seq_len + seq_len + 1].tobytes(): i for i in range(n_windows)}
    while len(starts) < 2 * n_windows:
        tokens, doc_ids = next(loader)
        assert tokens.shape == doc_ids.shape == (8, seq_len + 1) and tokens.dtype == doc_ids.dtype == torch.int64
        starts.extend(windows[row.numpy().tobytes()] for row in tokens)
    first, second = starts[:n_windows], starts[n_windows:2 * n_windows]
    assert sorted(first) == sorted(second) == list(range(n_windows))  # each epoch visits every window once
    assert first != second and first != sorted(first)  # ... in a fresh, shuffled order


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
def test_feistel_is_a_permutation(n: int) -> None:
    keys = np.random.SeedSequence(n).generate_state(6, dtype=np.uint64)
    assert sorted(feistel_permute(np.arange(n), n, keys).tolist()) == list(range(n))


def test_doc_ids_change_exactly_at_bos(mixture: dict) -> None:
    loader = MixtureLoader(mixture, seq_len=64, batch_size=8, seed=0)
    for _ in range(20):
        tokens, doc_ids = next(loader)
        assert (doc_ids[:, 0] == 0).all()
        starts = doc_ids[:, 1:] != doc_ids[:, :-1]
        assert torch.equal(starts, tokens[:, 1:] == 1)  # a new document starts exactly at each bos
        assert ((doc_ids[:, 1:] - doc_ids[:, :-1]) >= 0).all()


def test_same_seed_same_batches(mixture: dict) -> None:
    a = MixtureLoader(mixture, seq_len=32, batch_size=4, seed=7)
    b = MixtureLoader(mixture, seq_len=32, batch_size=4, seed=7)
    c = MixtureLoader(mixture, seq_len=32, batch_size=4, seed=8)
    batches_a, batches_b, batches_c = ([next(x)[0] for _ in range(10)] for x in (a, b, c))
    assert all(torch.equal(x, y) for x, y in zip(batches_a, batches_b))
    assert not any(torch.equal(x, y) for x, y in zip(batches_a, batches_c))


def test_resume_continues_exactly(mixture: dict) -> None:
    kwargs = dict(seq_len=64, batch_size=8, seed=11)
    reference = MixtureLoader(mixture, **kwargs)
    full = [next(reference) for _ in range(100)]
    assert reference.epochs()["wiki"] > 2  # resumption crosses epochs of the small source
    first = MixtureLoader(mixture, **kwargs)
    for _ in range(37):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON (or torch.save) round trip
    resumed = MixtureLoader(mixture, **kwargs)
    resumed.load_state_dict(state)
    for want, got in zip(full[37:], (next(resumed) for _ in range(63)), strict=True):
        assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])

    other = MixtureLoader(mixture, seq_len=64, batch_size=8, seed=12)
    with pytest.raises(DataError, match="seed=11"):
        other.load_state_dict(state)
    fewer = MixtureLoader({k: v for k, v in mixture.items() if k != "wiki"}, **kwargs)
    with pytest.raises(DataError, match="sources"):
        fewer.load_state_dict(state)


def test_ranks_are_disjoint_and_cover_one_rank(mixture: dict) -> None:
    world, batch = 3, 2
    single = MixtureLoader(mixture, seq_len=16, batch_size=world * batch, seed=5)
    ranks = [MixtureLoader(mixture, seq_len=16, batch_size=batch, seed=5, rank=r, world_size=world)
             for r in range(world)]
    for step in range(10):
        tokens, doc_ids = next(single)
        parts = [next(r) for r in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), tokens)
        assert torch.equal(torch.cat([p[1] for p in parts]), doc_ids)
    assert all(r.state_dict() == single.state_dict() for r in ranks)  # one state for every rank
    # A single-process state resumes on 3 ranks (and back): the global order is kept.
    state = single.state_dict()
    want = [next(single) for _ in range(3)]
    for r in ranks:
        r.load_state_dict(state)
    for tokens, _ in want:
        assert torch.equal(torch.cat([next(r)[0] for r in ranks]), tokens)
    # Across the run no (source, draw) pair is given to two ranks.
    seen = [set() for _ in range(world)]
    fresh = [MixtureLoader(mixture, seq_len=16, batch_size=batch, seed=5, rank=r, world_size=world)
             for r in range(world)]
    for _ in range(10):
        for r, loader in enumerate(fresh):
            plan = loader._plan()[r * batch:(r + 1) * batch]
            seen[r].update(plan)
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])


def test_loader_errors(mixture: dict, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="expected at least seq_len"):
        MixtureLoader(mixture, seq_len=100_000, batch_size=1, seed=0)
    with pytest.raises(DataError, match="non-negative"):
        MixtureLoader({"web": (mixture["web"][0], -1.0)}, seq_len=8, batch_size=1, seed=0)
    with pytest.raises(DataError, match="no token shards"):
        MixtureLoader({"x": ([tmp_path], 1.0)}, seq_len=8, batch_size=1, seed=0)
    with pytest.raises(DataError, match="rank"):
        MixtureLoader(mixture, seq_len=8, batch_size=1, seed=0, rank=2, world_size=2)
    sources = mixture_sources(Path(mixture["web"][0][0]).parent, {"web": 2.0, "code": 1.0})
    assert MixtureLoader(sources, seq_len=8, batch_size=1, seed=0).weights.tolist() == pytest.approx([1 / 3, 2 / 3])


# ------------------------------------------------------------------------------------------
# Validation batches and the CLI parser
# ------------------------------------------------------------------------------------------


def test_eval_batches_fixed_order(mixture: dict) -> None:
    paths, _ = mixture["code"]
    seq_len, batch = 32, 4
    stream = _concat(paths)
    n_windows = (len(stream) - 1) // seq_len
    batches = list(eval_batches(paths, seq_len, batch))
    assert len(batches) == -(-n_windows // batch)
    assert batches[-1][0].shape[0] == (n_windows % batch or batch)
    rows = torch.cat([b[0] for b in batches])
    want = np.stack([stream[i * seq_len: i * seq_len + seq_len + 1] for i in range(n_windows)])
    assert torch.equal(rows, torch.from_numpy(want))
    again = list(eval_batches(paths, seq_len, batch, max_batches=3))
    assert len(again) == 3 and all(torch.equal(x[0], y[0]) for x, y in zip(again, batches))
    split = [list(eval_batches(paths, seq_len, batch, rank=r, world_size=2)) for r in range(2)]
    assert all(torch.equal(b[0], batches[i][0]) for i, b in zip(range(0, len(batches), 2), split[0], strict=True))
    assert len(split[0]) + len(split[1]) == len(batches)
    assert torch.equal(split[1][0][0], batches[1][0])


def test_tokenize_parser(corpus: dict, sp_model: Path, tmp_path: Path) -> None:
    parser = argparse.ArgumentParser(prog="llamalab")
    sub = parser.add_subparsers(dest="command")
    p = add_tokenize_parser(sub)
    assert "llamalab tokenize data/*.jsonl --tokenizer tok/llama.model --out data/tokens" in p.epilog
    args = parser.parse_args(["tokenize", str(corpus["whole"]), "--tokenizer", str(sp_model), "--out",
                              str(tmp_path / "t"), "--num-workers", "0", "--quiet"])
    assert args.func(args) == 0
    assert read_shard(find_shards(tmp_path / "t")[0]).n_documents == 1
    with pytest.raises(ValueError, match="no such file"):
        args.inputs = [str(tmp_path / "nope.txt")]
        args.func(args)
