"""The Llama 2 and Llama 3 pre-training recipes (configs/pretrain/), checked against the papers'
numbers, and Llama 3's schedule replayed at a tiny scale (configs/pretrain/cpu-llama3-schedule.toml)
with every step's batch, length, RoPE, learning rate and mixture read back from metrics.jsonl and
compared with what the config file says, and its final model the mean of the anneal's checkpoints.

The expected values are the papers' (Touvron et al. 2023b, table 1 and §2.2; Dubey et al. 2024,
§3.2, §3.4) or computed here from the run file by the schedule's formula, never read from an
earlier run of ours.
"""

from __future__ import annotations

import json
import math
import random
import tomllib
from pathlib import Path

import pytest
import torch

from llamalab.checkpoint.native import load_weights
from llamalab.cli import main
from llamalab.config import RopeScaling, get_preset
from llamalab.data import tokenize_files
from llamalab.tokenizer import train_sentencepiece
from llamalab.train.config import ConfigError, TrainConfig, load_config
from llamalab.train.metrics import read_metrics
from llamalab.train.state import list_checkpoints

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = ROOT / "configs" / "pretrain"
M = 2**20


# ---------------------------------------------------------------- Llama 2 (Touvron et al. 2023b)

@pytest.mark.parametrize("size, lr, gqa", [("7b", 3.0e-4, False), ("13b", 3.0e-4, False), ("70b", 1.5e-4, True)])
def test_llama2_recipe_is_the_papers(size: str, lr: float, gqa: bool) -> None:
    cfg = load_config(PRETRAIN / f"llama2-{size}.toml")
    model = cfg.model_config()
    assert model.max_seq_len == 4096 and cfg.train.seq_len == 4096
    assert (model.n_kv_heads < model.n_heads) == gqa
    if gqa:
        assert model.n_kv_heads == 8
    o = cfg.optim
    assert o.lr == pytest.approx(lr)
    assert (tuple(o.betas), o.eps, o.weight_decay, o.grad_clip) == ((0.9, 0.95), 1e-5, 0.1, 1.0)
    assert (o.warmup_steps, o.min_lr_ratio, o.schedule) == (2000, 0.1, "cosine")
    assert cfg.train.global_batch_tokens == 4 * M
    (only,) = cfg.schedule_table()
    assert abs(only["tokens_to"] - 2.0e12) <= 4 * M  # 2.0T tokens, to within one batch
    assert sum(s.weight for s in cfg.data.sources.values()) == pytest.approx(1.0)


# ---------------------------------------------------------------- Llama 3 (Dubey et al. 2024)

LLAMA31 = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=8192)


@pytest.mark.parametrize("size, preset", [("8b", "llama3-8b"), ("70b", "llama3-70b"), ("405b", "llama3-405b")])
def test_llama3_recipe_is_the_papers(size: str, preset: str) -> None:
    cfg = load_config(PRETRAIN / f"llama3-{size}.toml")
    model = cfg.model_config()
    ref = get_preset(preset)
    assert (model.dim, model.n_layers, model.n_heads, model.n_kv_heads, model.vocab_size) == \
        (ref.dim, ref.n_layers, ref.n_heads, 8, 128256)
    assert model.rope_theta == 500000.0 and model.rope_scaling is None  # the scaling comes with long context
    o, t = cfg.optim, cfg.train
    if size == "405b":
        assert o.lr == pytest.approx(8e-5) and o.lr * o.min_lr_ratio == pytest.approx(8e-7)
    assert (o.warmup_steps, t.total_steps) == (8000, 1_200_000)
    assert t.document_mask and cfg.checkpoint.average_anneal and o.schedule == "linear-anneal"

    rows = cfg.schedule_table()
    by_tokens = lambda n: next(r for r in rows if r["tokens_from"] <= n < r["tokens_to"])  # noqa: E731
    # §3.4.1: 4M tokens of 4,096 -> 8M of 8,192 after 252M tokens -> 16M after 2.87T.
    assert (rows[0]["global_batch_tokens"], rows[0]["seq_len"]) == (4 * M, 4096)
    assert (by_tokens(252e6 + 8 * M)["global_batch_tokens"], by_tokens(252e6 + 8 * M)["seq_len"]) == (8 * M, 8192)
    assert by_tokens(252e6 - 4 * M)["global_batch_tokens"] == 4 * M
    assert (by_tokens(2.87e12 + 16 * M)["global_batch_tokens"], by_tokens(2.87e12 + 16 * M)["seq_len"]) == (16 * M, 8192)
    assert by_tokens(2.87e12 - 8 * M)["global_batch_tokens"] == 8 * M
    # §3.4.2: six stages from 8K up to 128K over ~800B tokens, RoPE base 500,000, the 3.1 scaling.
    long = [r for r in rows if r["seq_len"] > 8192 and not r["anneal"]]
    assert len(long) == 6 and long[-1]["seq_len"] == 131072
    assert all(a["seq_len"] < b["seq_len"] for a, b in zip(long, long[1:]))
    long_tokens = rows[-1]["tokens_to"] - long[0]["tokens_from"]
    assert 0.75e12 <= long_tokens <= 0.85e12
    for r in long + [rows[-1]]:
        assert r["rope_theta"] == 500000.0 and RopeScaling(**r["rope_scaling"]) == LLAMA31
        assert abs(r["global_batch_tokens"] - 16 * M) <= M  # ~16M tokens per batch
    # §3.4.3: the last 40M tokens at 128K, lr linearly to 0, high-quality sources up-sampled.
    anneal = rows[-1]
    assert anneal["anneal"] and anneal["seq_len"] == 131072 and anneal["last_step"] == t.total_steps
    assert 40e6 <= anneal["tokens_to"] - anneal["tokens_from"] < 40e6 + anneal["global_batch_tokens"]
    assert anneal["mixture"]["general"] < rows[0]["mixture"]["general"]
    # §3.1.2: ~50% general knowledge, 25% math and reasoning, 17% code, 8% multilingual.
    assert {k: s.weight for k, s in cfg.data.sources.items()} == \
        {"general": 0.50, "math": 0.25, "code": 0.17, "multilingual": 0.08}


def test_pretrain_dry_run_prints_the_schedule(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pretrain", "--config", str(PRETRAIN / "llama3-405b.toml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "9 anneal" in out and "128 x 131,072" in out and "1,024 x 4,096" in out
    assert main(["pretrain", "--config", str(PRETRAIN / "llama3-405b.toml"), "--dry-run", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["stage"] for r in rows] == list(range(10))


# ---------------------------------------------------------------- config errors

def _tiny(**extra: object) -> dict:
    d: dict = {"model": {"preset": "tiny"}, "data": {"sources": {"a": {"shards": "x", "weight": 1.0}}},
               "train": {"total_steps": 20, "global_batch_tokens": 256, "seq_len": 32, "micro_batch_size": 8},
               "optim": {"warmup_steps": 2, "schedule": "linear-anneal", "anneal_tokens": 512}}
    for k, v in extra.items():
        d[k] = v
    return d


@pytest.mark.parametrize("change, message", [
    ({"stages": [{"anneal": True}, {"start_tokens": 1024}]}, "must be the last"),
    ({"stages": [{"start_tokens": 1024, "anneal": True}]}, "exactly one of start_tokens and anneal"),
    ({"stages": [{"seq_len": 64}]}, "exactly one of start_tokens and anneal"),
    ({"stages": [{"start_tokens": 4096, "rope_scaling": {"factor": 8.0, "speed": 2.0}}]}, "rope_scaling"),
    ({"checkpoint": {"average_anneal": True, "every": 0, "anneal_every": 0}}, "anneal_every"),
    ({"stages": [{"start_tokens": 4800}, {"anneal": True}]}, "anneal begins at"),
])
def test_bad_stage_configs_are_one_line(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict(_tiny(**change))


def test_anneal_needs_the_linear_anneal_schedule() -> None:
    d = _tiny(stages=[{"anneal": True}])
    d["optim"] = {"warmup_steps": 2}
    with pytest.raises(ConfigError, match="linear-anneal"):
        TrainConfig.from_dict(d)
    d = _tiny(checkpoint={"average_anneal": True})
    d["optim"] = {"warmup_steps": 2}
    with pytest.raises(ConfigError, match="average_anneal"):
        TrainConfig.from_dict(d)
    d = _tiny()
    d["optim"]["anneal_steps"] = 2
    with pytest.raises(ConfigError, match="not both"):
        TrainConfig.from_dict(d)


def test_anneal_tokens_count_the_anneal_stages_batch() -> None:
    cfg = TrainConfig.from_dict(_tiny(stages=[{"anneal": True, "global_batch_tokens": 128, "micro_batch_size": 4}]))
    assert cfg.anneal_steps() == 4  # 512 tokens / 128 per step
    rows = cfg.schedule_table()
    assert rows[-1]["anneal"] and rows[-1]["first_step"] == 17 and rows[-1]["steps"] == 4
    assert rows[-1]["tokens_from"] == 16 * 256


# ---------------------------------------------------------------- the CPU replay of Llama 3's schedule

WORDS = {"plays": ["king", "crown", "lord", "battle", "sword", "castle", "night", "ghost"],
         "poems": ["love", "rose", "summer", "beauty", "eyes", "heart", "time", "verse"]}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two sources with their own vocabularies (so a sequence's source is plain), one tokenizer."""
    root = tmp_path_factory.mktemp("llama3-replay")
    rng = random.Random(0)
    for name, words in WORDS.items():
        docs = [" ".join(rng.choice(words) for _ in range(rng.randint(20, 120))) + "." for _ in range(400)]
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    val = [" ".join(rng.choice(WORDS["plays"] + WORDS["poems"]) for _ in range(80)) for _ in range(40)]
    (root / "val.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in val))
    tok = train_sentencepiece([root / "plays.jsonl", root / "poems.jsonl"], root / "tok" / "tok", vocab_size=300)
    for name in ("plays", "poems", "val"):
        tokenize_files([root / f"{name}.jsonl"], tok, root / "tokens" / name, progress=False)
    return root


def _expected_lr(step: int, peak: float, warmup: int, total: int, anneal: int, min_ratio: float) -> float:
    """Llama 3's schedule written out: linear warmup, cosine to min_ratio * peak at the anneal's
    start, then a straight line to 0 at the last step (lr of 0-based step ``step``)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    end = total - anneal
    if step <= end:
        return min_ratio * peak + (peak - min_ratio * peak) * (1 + math.cos(math.pi * (step - warmup) / (end - warmup))) / 2
    return min_ratio * peak * (total - step) / anneal


def test_cpu_replay_of_the_llama3_schedule(corpus: Path, tmp_path: Path) -> None:
    path = PRETRAIN / "cpu-llama3-schedule.toml"
    raw = tomllib.loads(path.read_text())
    run_dir = tmp_path / "run"
    overrides = [f'run_dir="{run_dir}"', "model.overrides.vocab_size=300",
                 f'data.val_shards="{corpus / "tokens" / "val"}"', f'data.tokenizer="{corpus / "tok" / "tok.model"}"',
                 f'data.sources.plays.shards="{corpus / "tokens" / "plays"}"',
                 f'data.sources.poems.shards="{corpus / "tokens" / "poems"}"']
    torch.set_num_threads(1)
    try:
        assert main(["pretrain", "--config", str(path), "--no-progress", *overrides]) == 0
    finally:
        torch.set_num_threads(2)
    records = [r for r in read_metrics(run_dir) if "loss" in r]
    t, o = raw["train"], raw["optim"]
    assert [r["step"] for r in records] == list(range(1, t["total_steps"] + 1))

    # What the file says, walked step by step here: a stage holds from the first step that begins
    # with its start_tokens seen; the anneal covers the last ceil(anneal_tokens / batch) steps.
    plain = [s for s in raw["stages"] if "start_tokens" in s]
    anneal_stage = raw["stages"][-1]
    assert anneal_stage.get("anneal") is True
    cur = {"batch": t["global_batch_tokens"], "seq": t["seq_len"], "theta": raw["model"]["overrides"]["rope_theta"],
           "factor": 1.0, "mix": {k: v["weight"] for k, v in raw["data"]["sources"].items()}}
    last_batch = [t["global_batch_tokens"]] + [s["global_batch_tokens"] for s in plain if "global_batch_tokens" in s]
    last_batch = last_batch[-1]  # the batch in force when the anneal begins
    n_anneal = math.ceil(o["anneal_tokens"] / anneal_stage.get("global_batch_tokens", last_batch))
    tokens, expected = 0, []
    for step in range(1, t["total_steps"] + 1):
        for s in plain:
            if s["start_tokens"] <= tokens and not s.get("_applied"):
                s["_applied"] = True
                cur["batch"] = s.get("global_batch_tokens", cur["batch"])
                cur["seq"] = s.get("seq_len", cur["seq"])
                cur["theta"] = s.get("rope_theta", cur["theta"])
                cur["factor"] = s.get("rope_scaling", {}).get("factor", cur["factor"])
        if step > t["total_steps"] - n_anneal:
            cur["mix"] = anneal_stage["mixture"]
        expected.append(dict(cur))
        tokens += cur["batch"]
    for rec, want in zip(records, expected):
        got = (rec["batch_tokens"], rec["seq_len"], rec["rope_theta"], rec["rope_factor"])
        assert got == (want["batch"], want["seq"], want["theta"], want["factor"]), (rec["step"], got, want)
        lr = _expected_lr(rec["step"] - 1, o["lr"], o["warmup_steps"], t["total_steps"], n_anneal, o["min_lr_ratio"])
        assert rec["lr"] == pytest.approx(lr, rel=1e-9, abs=1e-12), rec["step"]
    assert records[-1]["tokens_seen"] == sum(w["batch"] for w in expected)
    assert len({(w["batch"], w["seq"], w["theta"]) for w in expected}) >= 5  # every stage kind was met

    # The mixture: the poems' share of the sequences drawn, before the anneal and in it.
    def share(recs: list[dict]) -> float:
        n = [r["batch_tokens"] // r["seq_len"] for r in recs]
        return sum(r.get("mix_poems", 0.0) * k for r, k in zip(recs, n)) / sum(n)

    before, during = records[:-n_anneal], records[-n_anneal:]
    assert abs(share(before) - 0.1) < 0.05
    assert share(during) > 0.25 and share(during) > 2 * share(before)
    assert records[-1]["lr"] < records[-n_anneal - 1]["lr"] and "val_loss" in records[-1]
    assert records[-1]["loss"] < records[0]["loss"] - 1.0  # it learned (ln 300 = 5.7 at the start)

    # Polyak averaging: final = the mean of the anneal's checkpoints; final-last = the last step.
    ckpts = [p for s, p in list_checkpoints(run_dir) if s > t["total_steps"] - n_anneal]
    assert len(ckpts) == n_anneal
    states = [load_weights(p)[0] for p in ckpts]
    final, _ = load_weights(run_dir / "final")
    last, _ = load_weights(run_dir / "final-last")
    assert set(final) == set(states[0])
    for name in final:
        mean = torch.stack([s[name].double() for s in states]).mean(0)
        torch.testing.assert_close(final[name].double(), mean, rtol=0, atol=1e-6)
        torch.testing.assert_close(last[name], states[-1][name], rtol=0, atol=0)
    assert not torch.equal(final["layers.0.attention.wq.weight"], last["layers.0.attention.wq.weight"])
    # `llamalab plot` draws the staged schedule beside loss and lr.
    assert main(["plot", str(run_dir)]) == 0
    assert (run_dir / "plots" / "schedule.png").stat().st_size > 10_000
    # The exported model carries the last stage's RoPE (base and scaling).
    manifest = json.loads((run_dir / "final" / "llamalab.json").read_text())
    assert manifest["config"]["rope_theta"] == 500000.0 and manifest["config"]["rope_scaling"]["factor"] == 4.0


# ---------------------------------------------------------------- llamalab average

def _save_random(path: Path, seed: int, **overrides: object) -> dict[str, torch.Tensor]:
    from llamalab.checkpoint import write_checkpoint
    from llamalab.checkpoint.base import Checkpoint
    from llamalab.model import Transformer

    torch.manual_seed(seed)
    cfg = get_preset("tiny", **overrides)
    model = Transformer(cfg)
    model.init_weights()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    write_checkpoint(Checkpoint(config=cfg, state_dict=state, tokenizer=None, format="native", path=path), path)
    return state


def test_average_cli_is_the_mean(tmp_path: Path) -> None:
    a = _save_random(tmp_path / "a", 1)
    b = _save_random(tmp_path / "b", 2)
    c = _save_random(tmp_path / "c", 3)
    assert main(["average", str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c"),
                 "--out", str(tmp_path / "mean")]) == 0
    got, _ = load_weights(tmp_path / "mean")
    for name in got:
        want = (a[name].double() + b[name].double() + c[name].double()) / 3
        torch.testing.assert_close(got[name].double(), want, rtol=0, atol=1e-7)
    assert main(["average", str(tmp_path / "a"), str(tmp_path / "b"), "--weights", "3,1",
                 "--out", str(tmp_path / "w")]) == 0
    got, _ = load_weights(tmp_path / "w")
    name = "layers.1.feed_forward.w2.weight"
    torch.testing.assert_close(got[name].double(), 0.75 * a[name].double() + 0.25 * b[name].double(), rtol=0, atol=1e-7)


def test_average_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _save_random(tmp_path / "a", 1)
    _save_random(tmp_path / "wide", 2, dim=128)
    assert main(["average", str(tmp_path / "a"), str(tmp_path / "wide"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "config differs" in err and "dim" in err and "wide" in err
    assert main(["average", str(tmp_path / "a"), "--out", str(tmp_path / "x")]) == 2
    assert "at least two" in capsys.readouterr().err
    assert main(["average", str(tmp_path / "a"), str(tmp_path / "a"), "--weights", "1,x",
                 "--out", str(tmp_path / "x")]) == 2
    assert "--weights" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
