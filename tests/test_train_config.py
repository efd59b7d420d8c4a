"""TrainConfig from TOML: defaults, overrides, stages, and one clear line for each mistake."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llamalab.train.config import ConfigError, TrainConfig, grad_accum_steps, load_config

RUN = """\
run_dir = "runs/tiny"
seed = 7

[model]
preset = "tiny"
overrides = { n_layers = 3, max_seq_len = 512 }

[data]
val_shards = "data/val/*.bin"
[data.sources.web]
shards = "data/web/*.bin"
weight = 0.8
[data.sources.code]
shards = "data/code/*.bin"
weight = 0.2

[train]
total_steps = 1000
global_batch_tokens = 8192
seq_len = 128
micro_batch_size = 4
precision = "fp32"

[optim]
lr = 1e-3
warmup_steps = 100

[[stages]]
start_tokens = 1_000_000
global_batch_tokens = 16384
seq_len = 256

[[stages]]
start_tokens = 4_000_000
rope_theta = 500000.0
mixture = { web = 0.5, code = 0.5 }
"""


def write(tmp_path: Path, text: str = RUN) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_defaults_are_the_llama_recipe() -> None:
    cfg = load_config(None)
    o, t = cfg.optim, cfg.train
    assert (o.lr, o.betas, o.weight_decay, o.grad_clip, o.warmup_steps, o.min_lr_ratio, o.eps) == (
        3e-4, (0.9, 0.95), 0.1, 1.0, 2000, 0.1, 1e-5)
    assert (t.global_batch_tokens, t.seq_len) == (4 * 2**20, 2048)
    assert cfg.model_config().dim == 4096
    assert cfg.grad_accum_steps() == 2048


def test_load_file_and_stages(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path))
    assert cfg.run_dir == "runs/tiny" and cfg.seed == 7
    assert cfg.model_config().n_layers == 3 and cfg.model_config().dim == 64
    assert cfg.data.sources["code"].weight == 0.2 and cfg.data.val_shards == "data/val/*.bin"
    assert cfg.optim.lr == 1e-3 and cfg.optim.betas == (0.9, 0.95)
    assert cfg.grad_accum_steps() == 16
    assert cfg.grad_accum_steps(world_size=2) == 8
    s0, s1, s2 = cfg.resolved_stages()
    assert (s0.seq_len, s0.global_batch_tokens, s0.mixture) == (128, 8192, {"web": 0.8, "code": 0.2})
    assert (s1.start_tokens, s1.seq_len, s1.global_batch_tokens, s1.micro_batch_size) == (1_000_000, 256, 16384, 4)
    assert (s2.seq_len, s2.rope_theta, s2.mixture) == (256, 500000.0, {"web": 0.5, "code": 0.5})
    assert cfg.stage_at(999_999).index == 0 and cfg.stage_at(1_000_000).index == 1
    assert cfg.stage_at(10**12).index == 2
    # The tree round-trips through a plain dict (saved in checkpoints as JSON).
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_overrides(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path), ["optim.lr=3e-4", "train.seq_len=64", "train.precision=bf16",
                                        "optim.betas=[0.9, 0.99]", "model.overrides.dim=128",
                                        "stages.0.seq_len=512", "data.sources.web.weight=2",
                                        "data.sources.books.shards=books/*.bin", "train.compile=true"])
    assert cfg.optim.lr == 3e-4 and cfg.train.seq_len == 64 and cfg.train.precision == "bf16"
    assert cfg.optim.betas == (0.9, 0.99) and cfg.model_config().dim == 128 and cfg.stages[0].seq_len == 512
    assert cfg.data.sources["web"].weight == 2.0 and cfg.data.sources["books"].shards == "books/*.bin"
    assert cfg.train.compile is True
    assert load_config(write(tmp_path)).train.onednn_linear == "auto"  # the default
    assert load_config(write(tmp_path), ["train.onednn_linear=false"]).train.onednn_linear is False


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1e-3", "override 'optim.lrr=1e-3': unknown key 'optim.lrr' (did you mean 'lr'?"),
    ("optim.lr=fast", "override 'optim.lr=fast': optim.lr: expected a number, got 'fast' (str)"),
    ("train.seq_len=128.5", "train.seq_len: expected an integer, got 128.5"),
    ("train.compile=1", "train.compile: expected true or false, got 1"),
    ("train.precision=fp16", "train.precision: expected one of 'auto', 'fp32', 'bf16', got 'fp16'"),
    ("train.onednn_linear=yes", "train.onednn_linear: expected true or false or one of 'auto', got 'yes'"),
    ("model.overrides.dimm=3", "unknown key 'model.overrides.dimm' (did you mean 'dim'?"),
    ("model.overrides.dim=big", "model.overrides.dim: expected an integer, got 'big'"),
    ("model.preset=llama9", "model.preset: unknown preset 'llama9'"),
    ("optim.betas=[0.9]", "optim.betas: expected a list of 2 numbers"),
    ("stages.5.seq_len=1", "no entry 5"),
    ("optim.lr", "expected KEY=VALUE"),
    ("train.seq_len.x=1", "train.seq_len is a value, not a section"),
])
def test_override_errors_name_the_key(tmp_path: Path, override: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path), [override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("edit, message", [
    (("[optim]", "[optim]\nlearning_rate = 1"), "unknown key 'optim.learning_rate'"),
    (("[train]", "[trian]\nx = 1\n[train]"), "unknown key 'trian'"),
    (('seq_len = 128', 'seq_len = "128"'), "train.seq_len: expected an integer, got '128' (str)"),
    (('weight = 0.8', 'weigth = 0.8'), "unknown key 'data.sources.web.weigth'"),
    (('shards = "data/code/*.bin"', ''), "missing key 'data.sources.code.shards'"),
    (("start_tokens = 4_000_000", "start_tokens = 500"), "stages[1].start_tokens=500: must be greater than"),
    (("mixture = { web", "mixture = { books = 1.0, web"), "stages[1].mixture.books: no such data source"),
    (("seq_len = 256", "seq_len = 1024"), "stages[0].seq_len=1024 exceeds the model's max_seq_len=512"),
    (("micro_batch_size = 4", "micro_batch_size = 3"),
     "train.global_batch_tokens=8192 is not a multiple of seq_len * micro_batch_size * world_size = 128 * 3 * 1"),
    (("warmup_steps = 100", "warmup_steps = 5000"), "optim: need 0 <= warmup_steps < total_steps"),
    (("lr = 1e-3", "lr = -1.0"), "optim.lr=-1.0: must be > 0"),
    (("[optim]", "[optim]\nschedule = \"linear-anneal\""), "needs 0 < anneal_steps"),
    (("weight = 0.2", "weight = 0"), "data.sources.code.weight=0.0: must be > 0"),
    (("seed = 7", "seed = 7\n[[stages"), "invalid TOML"),
])
def test_file_errors_name_the_key_and_file(tmp_path: Path, edit: tuple[str, str], message: str) -> None:
    old, new = edit
    assert old in RUN
    path = write(tmp_path, RUN.replace(old, new, 1))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert message in str(e.value)
    assert str(path) in str(e.value)
    assert "\n" not in str(e.value)


def test_batch_arithmetic_depends_on_world_size(tmp_path: Path) -> None:
    path = write(tmp_path)
    assert load_config(path, world_size=4).grad_accum_steps(4) == 4
    with pytest.raises(ConfigError, match=r"world_size = 128 \* 4 \* 3 = 1536"):
        load_config(path, world_size=3)
    with pytest.raises(ConfigError, match="stages\\[0\\].global_batch_tokens=16384"):
        load_config(path, ["train.global_batch_tokens=24576"], world_size=3)
    assert grad_accum_steps(4 * 2**20, 4096, 2, 8) == 64  # Llama 3 first stage on 8 processes


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="nope.toml: no such file"):
        load_config("nope.toml")
