"""Ghost Attention (finetune/gatt.py): the instruction checks by hand, the data construction (the
instruction before every user message while sampling, in the system message only in the record,
the loss on the last answer only, checked token by token on the rendered dialogue), and the
adherence-by-turn measurement on a scripted model."""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_finetune import base  # noqa: E402,F401  (the tiny checkpoint)

from llamalab.finetune.gatt import (  # noqa: E402
    CHECKABLE,
    Constraint,
    Instruction,
    adherence_by_turn,
    dialogue_pools,
    format_adherence,
    gatt_records,
    sample_gatt_answers,
    sample_instruction,
)


@pytest.mark.parametrize("constraint,reply,ok", [
    (Constraint("word", "Cheers"), "Sure, happy to help. Cheers!", True),
    (Constraint("word", "Cheers"), "Cheers! Sure, happy to help.", False),
    (Constraint("word", "Cheers"), "", False),
    (Constraint("caps"), "I AM FINE, THANK YOU.", True),
    (Constraint("caps"), "I am fine, thank you.", False),
    (Constraint("caps"), "42", False),
    (Constraint("language", "French"), "Bonjour, je suis très content de vous voir aujourd'hui, mon ami.", True),
    (Constraint("language", "French"), "Hello, I am very glad to see you today, my friend.", False),
    (Constraint("language", "German"), "Guten Tag, ich freue mich sehr, Sie heute zu sehen.", True),
    (Constraint("figure", "Napoleon"), "I am the emperor.", None),
    (Constraint("hobby", "chess"), "I like chess.", None),
])
def test_constraint_checks(constraint: Constraint, reply: str, ok: bool | None) -> None:
    assert constraint.check(reply) is ok


def test_instructions_combine_shorten_and_round_trip() -> None:
    inst = Instruction((Constraint("figure", "Napoleon"), Constraint("word", "Indeed")))
    assert inst.text() == 'Always act as Napoleon from now on. End every answer with the word "Indeed".'
    short = Instruction(inst.constraints, short=True)
    assert short.text() == "Figure: Napoleon. Sign-off: Indeed." and short.kind == "figure+word"
    assert Instruction.from_dict(short.to_dict()) == short
    # The figure cannot be checked, the sign-off can: the instruction's check is the sign-off's.
    assert inst.check("Vive la France. Indeed.") is True and inst.check("Vive la France.") is False
    assert Instruction((Constraint("hobby", "chess"),)).check("anything") is None
    rng = random.Random(0)
    drawn = [sample_instruction(rng) for _ in range(400)]
    assert all(1 <= len(i.constraints) <= 2 for i in drawn)
    assert not any({"language", "caps"} <= {c.kind for c in i.constraints} for i in drawn)  # they contradict
    assert 0.4 < sum(i.short for i in drawn) / len(drawn) < 0.6  # Llama 2: half shortened
    assert {c.kind for i in drawn for c in i.constraints} == {"language", "figure", "hobby", "word", "caps"}
    with pytest.raises(ValueError, match="kinds"):
        sample_instruction(rng, ["accent"])


def test_dialogue_pools_share_no_message() -> None:
    train, held = dialogue_pools(6, 10, 5, seed=1)
    assert len(train) == 10 and len(held) == 5 and all(len(d) == 6 for d in train + held)
    a = {m for d in train for m in d}
    b = {m for d in held for m in d}
    assert len(a) == 60 and len(b) == 30 and not a & b
    with pytest.raises(ValueError, match="distinct"):
        dialogue_pools(6, 10_000, 0)


def _dialogue() -> tuple[list[str], Instruction, list[str]]:
    users = ["Hi there.", "What is your name?", "Do you like music?"]
    inst = Instruction((Constraint("word", "Cheers"),))
    answers = ["Hello! Cheers", "I am a bot. Cheers", "Not really."]
    return users, inst, answers


def test_records_keep_the_instruction_in_the_system_message_only() -> None:
    users, inst, answers = _dialogue()
    recs = gatt_records([users], [inst], [answers], keep="all")
    # One record per turn after the first, each ending with the answer that carries the loss.
    assert [r["turn"] for r in recs] == [2, 3]
    last = recs[-1]["messages"]
    assert last[0] == {"role": "system", "content": inst.text()}
    assert [m["content"] for m in last[1:]] == [users[0], answers[0], users[1], answers[1], users[2], answers[2]]
    assert sum(inst.text() in m["content"] for m in last) == 1
    # keep="obeying": the dialogue stops at its first answer without the sign-off (turn 3).
    assert [r["turn"] for r in gatt_records([users], [inst], [answers], keep="obeying")] == [2]
    assert [r["turn"] for r in gatt_records([users], [inst], [answers], keep="all", every_turn=False)] == [3]


def test_the_loss_falls_on_the_last_answer_only_token_by_token(base: Path, tmp_path: Path) -> None:
    """The record rendered as SFT renders it with train_on = "last": every token up to the end of
    the prompt for the last answer (system instruction, earlier turns, earlier answers) has no loss;
    every token after it (the last answer and the end of its turn) has loss. The boundary comes
    from the chat template's own generation prompt, not from the SFT code."""
    import json

    import llamalab
    from llamalab.finetune.data import load_sft_samples
    from llamalab.generate.chat import encode_chat

    users, inst, answers = _dialogue()
    rec = gatt_records([users], [inst], [answers], keep="all")[-1]
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    tok = llamalab.load(base).tokenizer
    (sample,), _ = load_sft_samples([path], tok, train_on="last", max_len=4096)
    tokens, mask = sample.tokens.tolist(), sample.loss_mask.tolist()
    prompt = encode_chat(tok, rec["messages"][:-1])  # up to the last turn's "assistant" header
    assert tokens[:len(prompt)] == prompt
    answer_ids = tok.encode(answers[-1])
    assert tokens[len(prompt):len(prompt) + len(answer_ids)] == answer_ids
    assert len(tokens) == len(prompt) + len(answer_ids) + 1 and tokens[-1] in tok.stop_ids  # then <|eot_id|>
    assert mask == [False] * len(prompt) + [True] * (len(answer_ids) + 1)


@dataclass
class _Result:
    text: str
    ids: tuple[int, ...] = ()
    finish_reason: str = "stop"


class _ScriptedModel:
    """A stand-in generator that records its prompts and signs off with "Cheers" for the first
    ``obey`` turns only (a model that forgets its instruction)."""

    def __init__(self, tokenizer: Any, obey: int) -> None:
        self.tokenizer = tokenizer
        self.model = type("M", (), {"config": type("C", (), {"max_seq_len": 4096})()})()
        self.obey, self.calls, self.prompts = obey, 0, []

    def generate(self, prompts: list[list[int]], config: Any) -> list[_Result]:
        self.prompts.append([self.tokenizer.decode(p) for p in prompts])
        turn = self.calls
        self.calls += 1
        return [_Result("Fine. Cheers" if turn < self.obey else "Fine.") for _ in prompts]


def test_sampling_puts_the_instruction_before_every_user_message(base: Path) -> None:
    import llamalab

    tok = llamalab.load(base).tokenizer
    gen = _ScriptedModel(tok, obey=9)
    users, inst, _ = _dialogue()
    answers = sample_gatt_answers(gen, [users], [inst], max_new_tokens=8)
    assert answers == [["Fine. Cheers"] * 3]
    for turn, (prompt,) in enumerate(gen.prompts):  # turn t's prompt holds t + 1 user messages
        assert prompt.count(inst.text()) == turn + 1
        assert prompt.count("Fine. Cheers") == turn  # the earlier answers are in the context


def test_adherence_by_turn_counts_each_turn(base: Path, tmp_path: Path) -> None:
    import llamalab

    tok = llamalab.load(base).tokenizer
    gen = _ScriptedModel(tok, obey=2)
    users, _, _ = _dialogue()
    insts = [Instruction((Constraint("word", "Cheers"),)), Instruction((Constraint("caps"),)),
             Instruction((Constraint("hobby", "chess"),))]
    res = adherence_by_turn(gen, [users] * 3, insts, max_new_tokens=8)
    assert res["by_kind"] == {"caps": [0.0, 0.0, 0.0], "word": [1.0, 1.0, 0.0]}
    assert res["all"] == [0.5, 0.5, 0.0] and res["dialogues_checked"] == 2  # the hobby cannot be checked
    for prompts in gen.prompts:  # the instruction is in the system message only
        assert [p.count(insts[0].text()) for p in prompts][0] == 1
    from llamalab.finetune.gatt import plot_adherence

    png = plot_adherence({"before": res, "again": res}, tmp_path / "a.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = format_adherence({"before": res})
    assert "| before | word | 1 | 100% | 100% | 0% |" in table
    assert set(CHECKABLE) == {"language", "word", "caps"}
