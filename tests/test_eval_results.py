"""Results files, the markdown table, `eval compare`, and sliding-window perplexity.

Perplexity is checked against transformers' LlamaForCausalLM on a tiny random model: the
summed NLL over strided windows, computed the way the transformers perplexity guide does it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from llamalab.eval.base import TaskResult, mean_stderr
from llamalab.eval.results import add_rows, compare_markdown, load_results, markdown_table, new_run, write_results


def test_mean_stderr_is_the_sample_stderr() -> None:
    values = [1.0, 0.0, 1.0, 1.0]  # mean 0.75, sample variance 0.25 -> stderr sqrt(0.25 / 4) = 0.25
    assert mean_stderr(values) == pytest.approx(0.25)
    assert math.isnan(mean_stderr([1.0]))


def _doc(model: str, acc: float) -> dict:
    doc = new_run(model, {"shots": None, "limit": 10})
    add_rows(doc, [TaskResult("piqa", "acc", acc, 0.1, 10, {"headline": False, "shots": 0, "source": "s"}),
                   TaskResult("piqa", "acc_norm_char", 0.5, float("nan"), 10, {"headline": True, "shots": 0}),
                   TaskResult("mmlu/anatomy", "acc", 0.25, 0.1, 4, {"headline": True, "category": "STEM"})])
    return doc


def test_results_round_trip_and_markdown(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    write_results(path, _doc("m", 0.7))
    doc = load_results(path)
    assert doc["results"][1]["stderr"] is None  # NaN is not JSON: stored as null
    md = markdown_table(doc)
    assert "| piqa | acc | 70.0 | 10.0 | 10 | 0 | s |" in md
    assert "| piqa | **acc_norm_char** | **50.0** | n/a |" in md
    assert "| mmlu/anatomy | STEM | acc | 25.0 |" in md  # per-subject rows in their own table


def test_compare_shows_the_difference(tmp_path: Path) -> None:
    md = compare_markdown(_doc("a", 0.7), _doc("b", 0.65))
    assert "| piqa | acc | 70.0 | 65.0 | -5.0 | 10/10 |" in md
    assert "mmlu/anatomy" not in md and "mmlu/anatomy" in compare_markdown(_doc("a", 0.7), _doc("b", 0.6),
                                                                            subtasks=True)


def test_load_results_names_the_file_on_bad_input(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not JSON"):
        load_results(bad)
    bad.write_text(json.dumps({"results": []}))
    with pytest.raises(ValueError, match="bad.json: not a llamalab eval results file"):
        load_results(bad)


@pytest.mark.parametrize("window,stride", [(16, 16), (16, 5), (24, 8)])
def test_sliding_window_perplexity_matches_transformers(window: int, stride: int, tmp_path: Path) -> None:
    from test_eval_lm import TEXT, tiny_pair

    from llamalab.eval.lm import EvalModel
    from llamalab.eval.perplexity import file_perplexity

    loaded, hf = tiny_pair()
    lm = EvalModel(loaded, batch_size=4)
    path = tmp_path / "t.txt"
    path.write_text(TEXT)
    rows = {r.metric: r for r in file_perplexity(lm, path, window=window, stride=stride)}
    # The transformers guide's loop: windows of `window` inputs ending every `stride` tokens,
    # each scoring only the tokens the previous window did not.
    ids = torch.tensor([[lm.prefix_token_id] + lm.encode(TEXT)])
    nll, prev_end, n = 0.0, 1, ids.shape[1]
    with torch.no_grad():
        end = min(window + 1, n)
        while prev_end < n:
            begin = max(end - window - 1, 0)
            logits = hf(ids[:, begin:end - 1]).logits[0].double()
            targets = ids[0, begin + 1:end]
            logprobs = torch.log_softmax(logits, -1)[torch.arange(len(targets)), targets]
            nll -= float(logprobs[-(end - prev_end):].sum())
            prev_end, end = end, min(end + stride, n)
    tokens = n - 1
    assert rows["ppl"].n == tokens
    assert rows["ppl"].value == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    assert rows["bits_per_byte"].value == pytest.approx(nll / math.log(2) / len(TEXT.encode()), rel=1e-5)
