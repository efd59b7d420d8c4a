"""Ghost Attention (Llama 2 §3.3): a system instruction that holds for every turn of a dialogue.

**Data** (:func:`sample_gatt_answers`, :func:`gatt_records`). From multi-turn dialogues (the user
side) and an instruction ("act as Napoleon", "speak in French", ...), the instruction is
concatenated to every user message and the current model answers turn by turn (batched through the
engine), so each answer is written with the instruction in view. The training sample keeps the
instruction only at the start (the system message) and zeroes the loss on every token of the
earlier turns, their assistant messages included: SFT with ``finetune.train_on = "last"`` on
records that end with the turn to learn (one record per turn, or the last turn only). As Llama 2:
constraints of several kinds, combined at random; half the instructions shortened ("Always act as
Napoleon from now" -> "Figure: Napoleon."). Llama 2 had its model write the lists of figures and
hobbies; here they are fixed lists. Optionally only dialogues whose answers obey the instruction
are kept (``keep="obeying"``, where the instruction can be checked).

**Evaluation** (:func:`adherence_by_turn`, Llama 2 Table 30's measurement): the instruction in the
system message only, the model answers turns 1..N of held-out dialogues with its own earlier
answers in the context (greedy), and each answer is checked programmatically: the language by
fastText's ``lid.176`` model (the one the data pipeline ships), a required sign-off word, a
capital-letters format; the share obeying per kind and turn, before and after GAtt fine-tuning.
Figures and hobbies have no programmatic check: they shape the training data, not the table.
"""

from __future__ import annotations

import json
import random
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["CHECKABLE", "Constraint", "Instruction", "KINDS", "adherence_by_turn", "dialogue_pools",
           "format_adherence", "gatt_records", "plot_adherence", "sample_gatt_answers", "sample_instruction"]

LANGUAGES = {"French": "fr", "Spanish": "es", "German": "de", "Italian": "it"}
FIGURES = ["Napoleon", "William Shakespeare", "Marie Curie", "Albert Einstein", "Cleopatra", "Leonardo da Vinci",
           "Abraham Lincoln", "Ada Lovelace"]
HOBBIES = ["tennis", "chess", "gardening", "painting", "hiking", "cooking", "astronomy", "sailing"]
SIGN_OFFS = ["Cheers", "Indeed", "Onward", "Splendid"]
KINDS = ("language", "figure", "hobby", "word", "caps")
CHECKABLE = ("language", "word", "caps")  # kinds with a programmatic check (the evaluation's rows)


@dataclass(frozen=True)
class Constraint:
    """One synthetic constraint: its ``kind`` (one of ``KINDS``) and value (a language, a figure,
    a hobby, a sign-off word; empty for ``caps``)."""

    kind: str
    value: str = ""

    def text(self, short: bool = False) -> str:
        """The constraint as an instruction sentence, or its short form."""
        v = self.value
        long_, short_ = {
            "language": (f"Always answer in {v}.", f"Language: {v}."),
            "figure": (f"Always act as {v} from now on.", f"Figure: {v}."),
            "hobby": (f"You enjoy {v}.", f"Hobby: {v}."),
            "word": (f"End every answer with the word \"{v}\".", f"Sign-off: {v}."),
            "caps": ("Answer in capital letters only.", "Format: all caps."),
        }[self.kind]
        return short_ if short else long_

    def check(self, reply: str) -> bool | None:
        """Whether ``reply`` obeys the constraint; None where no programmatic check exists."""
        if self.kind == "language":
            return _language(reply) == LANGUAGES[self.value]
        if self.kind == "word":
            words = re.findall(r"[^\W_]+", reply)
            return bool(words) and words[-1].lower() == self.value.lower()
        if self.kind == "caps":
            letters = [c for c in reply if c.isalpha()]
            return len(letters) >= 2 and sum(c.isupper() for c in letters) >= 0.9 * len(letters)
        return None


@dataclass(frozen=True)
class Instruction:
    """One or more constraints that hold for the whole dialogue, said in full or shortened."""

    constraints: tuple[Constraint, ...]
    short: bool = False

    @property
    def kind(self) -> str:
        """The kinds joined by "+" ("figure+word")."""
        return "+".join(c.kind for c in self.constraints)

    def text(self) -> str:
        """The instruction as the system message (or the text put before every user message)."""
        return " ".join(c.text(self.short) for c in self.constraints)

    def check(self, reply: str) -> bool | None:
        """All checkable constraints hold (None when none of them can be checked)."""
        results = [c.check(reply) for c in self.constraints]
        known = [r for r in results if r is not None]
        return all(known) if known else None

    def to_dict(self) -> dict[str, Any]:
        """JSON form: ``{"constraints": [[kind, value], ...], "short": bool, "text": ...}``."""
        return {"constraints": [[c.kind, c.value] for c in self.constraints], "short": self.short, "text": self.text()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Instruction":
        """Read what :meth:`to_dict` wrote."""
        return cls(tuple(Constraint(k, v) for k, v in d["constraints"]), bool(d.get("short", False)))


def _value(kind: str, rng: random.Random) -> str:
    return {"language": lambda: rng.choice(sorted(LANGUAGES)), "figure": lambda: rng.choice(FIGURES),
            "hobby": lambda: rng.choice(HOBBIES), "word": lambda: rng.choice(SIGN_OFFS),
            "caps": lambda: ""}[kind]()


def sample_instruction(rng: random.Random, kinds: Sequence[str] = KINDS, *, max_constraints: int = 2,
                       short_share: float = 0.5) -> Instruction:
    """A random instruction: 1..``max_constraints`` constraints of different ``kinds`` (at most one
    of language and caps, which would contradict), shortened with probability ``short_share``."""
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"gatt: kinds {list(kinds)}: expected some of {', '.join(KINDS)}")
    n = rng.randint(1, min(max_constraints, len(kinds)))
    chosen: list[str] = []
    for k in rng.sample(list(kinds), len(kinds)):
        if len(chosen) == n:
            break
        if {k, *chosen} >= {"language", "caps"}:
            continue
        chosen.append(k)
    order = {k: i for i, k in enumerate(KINDS)}
    chosen.sort(key=order.__getitem__)
    return Instruction(tuple(Constraint(k, _value(k, rng)) for k in chosen), rng.random() < short_share)


_LID: Any = None


def _language(text: str) -> str:
    """fastText lid.176's top language label of ``text`` ("en", "fr", ...)."""
    global _LID
    if _LID is None:
        from llamalab.data.pipeline.common import default_lid_model, load_fasttext

        _LID = load_fasttext(default_lid_model())
    labels, _ = _LID.predict(text.replace("\n", " ").strip() or ".", k=1)
    return labels[0].removeprefix("__label__") if labels else "unknown"


# ---------------------------------------------------------------- dialogues


def dialogue_pools(turns: int, train: int, held_out: int, *, seed: int = 0,
                   language: str = "english") -> tuple[list[list[str]], list[list[str]]]:
    """Multi-turn user sides from the ChatterBot corpus's user messages (distinct, shuffled with
    ``seed``): ``train`` dialogues and ``held_out`` others of ``turns`` messages each, no message in both."""
    from llamalab.finetune.datasets import chatterbot_conversations

    seen: dict[str, None] = {}
    for rec in chatterbot_conversations(language):
        for m in rec["messages"]:
            if m["role"] == "user":
                seen.setdefault(m["content"], None)
    pool = list(seen)
    random.Random(seed).shuffle(pool)
    need = turns * (train + held_out)
    if need > len(pool):
        raise ValueError(f"gatt: {train} + {held_out} dialogues of {turns} turns need {need} user messages; the "
                         f"ChatterBot corpus ({language}) has {len(pool)} distinct ones")
    cut = [pool[i * turns:(i + 1) * turns] for i in range(train + held_out)]
    return cut[:train], cut[train:]


def _with(inst: str, user: str) -> str:
    return f"{inst}\n\n{user}"


def _answer_turns(generator: Any, contexts: list[list[dict[str, str]]], users: list[list[str]], *,
                  instruction_every_turn: list[str | None], max_new_tokens: int, temperature: float, seed: int,
                  fmt: str | None, batch_size: int, progress: bool, label: str,
                  pick: list[Instruction] | None = None, k: int = 1) -> list[list[str]]:
    """Answer every dialogue turn by turn, the dialogues batched per turn; returns the answers.

    With ``k > 1`` each turn gets ``k`` candidates and keeps the first that ended and obeys
    ``pick[i]`` (else the first that ended, else the first): best of k by the instruction's check."""
    from llamalab.finetune.rejection import sample_seed
    from llamalab.generate.chat import chat_stop_ids, encode_chat
    from llamalab.generate.engine import GenerationConfig

    tok = generator.tokenizer
    stops = tuple(sorted(chat_stop_ids(tok, fmt)))
    turns = len(users[0])
    answers: list[list[str]] = [[] for _ in users]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=turns * len(users), desc=label, unit="answer", file=sys.stderr)
    context = generator.model.config.max_seq_len
    for t in range(turns):
        for i, u in enumerate(users):
            inst = instruction_every_turn[i]
            contexts[i].append({"role": "user", "content": _with(inst, u[t]) if inst else u[t]})
        per = max(1, batch_size // k)  # dialogues per call: k rows each
        for c, start in enumerate(range(0, len(users), per)):
            rows = list(range(start, min(start + per, len(users))))
            ids = [encode_chat(tok, contexts[i], fmt=fmt) for i in rows]
            for i, x in zip(rows, ids):
                if len(x) + max_new_tokens > context:
                    raise ValueError(f"gatt: dialogue {i} at turn {t + 1} is {len(x)} tokens; with max_new_tokens="
                                     f"{max_new_tokens} it exceeds the model's context of {context}: use fewer turns")
            cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, stop_ids=stops,
                                   seed=sample_seed(seed, t, c) if temperature > 0 else None)
            results = generator.generate([x for x in ids for _ in range(k)], cfg)
            for j, i in enumerate(rows):
                cands = results[j * k:(j + 1) * k]
                ended = [r for r in cands if r.finish_reason == "stop" and r.text.strip()]
                obeying = [r for r in ended if pick is not None and pick[i].check(r.text.strip())]
                text = (obeying or ended or cands)[0].text.strip()
                answers[i].append(text)
                contexts[i].append({"role": "assistant", "content": text})
            if bar is not None:
                bar.update(len(rows))
    if bar is not None:
        bar.close()
    return answers


def sample_gatt_answers(generator: Any, dialogues: Sequence[Sequence[str]], instructions: Sequence[Instruction], *,
                        max_new_tokens: int = 64, temperature: float = 0.7, seed: int = 0, fmt: str | None = None,
                        batch_size: int = 16, k: int = 1, progress: bool = False) -> list[list[str]]:
    """The model's answers to each dialogue with its instruction concatenated to every user message
    (the GAtt sampling step); ``dialogues[i]`` gets ``instructions[i]``. ``k`` candidates a turn,
    the first that ends and obeys kept ("a process analogous to Rejection Sampling", Llama 2)."""
    if k < 1:
        raise ValueError(f"gatt: k={k}; expected >= 1 candidates a turn")
    users = [list(d) for d in dialogues]
    return _answer_turns(generator, [[] for _ in users], users, instruction_every_turn=[i.text() for i in instructions],
                         max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, fmt=fmt,
                         batch_size=batch_size, progress=progress, label="gatt sampling", pick=list(instructions), k=k)


def gatt_records(dialogues: Sequence[Sequence[str]], instructions: Sequence[Instruction],
                 answers: Sequence[Sequence[str]], *, every_turn: bool = True, keep: str = "all") -> list[dict[str, Any]]:
    """SFT records for ``finetune.train_on = "last"``: the instruction as the system message only,
    then the dialogue up to a turn, ending with that turn's answer (the one with loss). One record
    per turn (``every_turn``) or for the last turn only. ``keep="obeying"``: only the turns whose
    answers so far all obey a checkable instruction (a dialogue stops at its first lapse)."""
    if keep not in ("all", "obeying"):
        raise ValueError(f"gatt: keep={keep!r}; expected 'all' or 'obeying'")
    out = []
    for users, inst, ans in zip(dialogues, instructions, answers):
        msgs: list[dict[str, str]] = [{"role": "system", "content": inst.text()}]
        ends = []
        for t, (u, a) in enumerate(zip(users, ans)):
            if keep == "obeying" and inst.check(a) is False:
                break
            if not a:
                break
            msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
            ends.append((t, list(msgs)))
        if not every_turn:
            ends = ends[-1:] if ends and ends[-1][0] == len(users) - 1 else []
        for t, m in ends:
            if t == 0 and every_turn:
                continue  # turn 1 has no earlier turn to carry the instruction past
            out.append({"messages": m, "instruction": inst.to_dict(), "turn": t + 1, "source": "gatt"})
    return out


# ---------------------------------------------------------------- evaluation


def adherence_by_turn(generator: Any, dialogues: Sequence[Sequence[str]], instructions: Sequence[Instruction], *,
                      max_new_tokens: int = 64, fmt: str | None = None, batch_size: int = 16,
                      progress: bool = False) -> dict[str, Any]:
    """Llama 2 Table 30's measurement: with ``instructions[i]`` in the system message only, the model
    answers dialogue i turn by turn (greedy, its own answers in the context), and each answer is
    checked. Returns ``{"by_kind": {kind: [share obeying at turn 1, ...]}, "all": [...], "dialogues": [...]}``."""
    users = [list(d) for d in dialogues]
    contexts = [[{"role": "system", "content": inst.text()}] for inst in instructions]
    answers = _answer_turns(generator, contexts, users, instruction_every_turn=[None] * len(users),
                            max_new_tokens=max_new_tokens, temperature=0.0, seed=0, fmt=fmt, batch_size=batch_size,
                            progress=progress, label="gatt evaluation")
    turns = len(users[0])
    rows = []
    for inst, u, a in zip(instructions, users, answers):
        rows.append({"instruction": inst.to_dict(), "kind": inst.kind, "users": u, "answers": a,
                     "obeys": [inst.check(x) for x in a]})
    by_kind: dict[str, list[float]] = {}
    for kind in sorted({r["kind"] for r in rows}):
        sel = [r for r in rows if r["kind"] == kind and r["obeys"][0] is not None]
        if sel:
            by_kind[kind] = [sum(bool(r["obeys"][t]) for r in sel) / len(sel) for t in range(turns)]
    checked = [r for r in rows if r["obeys"][0] is not None]
    overall = [sum(bool(r["obeys"][t]) for r in checked) / len(checked) for t in range(turns)] if checked else []
    return {"turns": turns, "dialogues_checked": len(checked), "by_kind": by_kind, "all": overall,
            "counts": {k: sum(r["kind"] == k for r in checked) for k in by_kind}, "dialogues": rows}


def format_adherence(results: dict[str, dict[str, Any]]) -> str:
    """Several :func:`adherence_by_turn` results (by name: "before", "after") as one Markdown table."""
    first = next(iter(results.values()))
    turns = first["turns"]
    lines = ["| model | instruction | n | " + " | ".join(f"turn {t + 1}" for t in range(turns)) + " |",
             "|---|---|---|" + "---|" * turns]
    for name, res in results.items():
        for kind, shares in [*res["by_kind"].items(), ("all", res["all"])]:
            n = res["counts"].get(kind, res["dialogues_checked"])
            lines.append(f"| {name} | {kind} | {n} | " + " | ".join(f"{100 * s:.0f}%" for s in shares) + " |")
    return "\n".join(lines)


def plot_adherence(results: dict[str, dict[str, Any]], path: str | Path,
                   title: str = "instruction followed, by turn") -> Path:
    """The share of answers obeying the system instruction at each turn, one line per result."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    styles = ["--", ":", "-."]
    for name, res in results.items():
        xs = list(range(1, res["turns"] + 1))
        (line,) = ax.plot(xs, [100 * s for s in res["all"]], marker="o", label=f"{name} (all kinds)")
        for j, (kind, shares) in enumerate(res["by_kind"].items()):  # the model's colour, one style per kind
            ax.plot(xs, [100 * s for s in shares], linestyle=styles[j % len(styles)], color=line.get_color(),
                    alpha=0.7, label=f"{name}: {kind}")
    ax.set_xlabel("turn")
    ax.set_ylabel("answers obeying the instruction (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_json(obj: Any, path: str | Path) -> Path:
    """``obj`` as indented JSON at ``path`` (atomically)."""
    import os

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
