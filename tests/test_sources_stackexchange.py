"""StackExchange source: largest sites, question + answers by integer score, HTML to text, bad XML."""

from __future__ import annotations

from pathlib import Path
from xml.sax.saxutils import quoteattr

from test_sources_common import run_local, step_stats

from llamalab.data.pipeline.sources import stackexchange


def _row(**attrs: str) -> str:
    return "  <row " + " ".join(f"{k}={quoteattr(v)}" for k, v in attrs.items()) + " />"


def _posts(rows: list[str], close: bool = True) -> str:
    return '<?xml version="1.0" encoding="utf-8"?>\n<posts>\n' + "\n".join(rows) + ("\n</posts>\n" if close else "")


def _sites(root: Path) -> None:
    math = [
        _row(Id="1", PostTypeId="1", Score="5", Title="Why is 0! = 1?", Body="<p>I do not see <b>why</b>.</p>"),
        _row(Id="2", PostTypeId="2", ParentId="1", Score="9", Body="<p>Nine: the empty product.</p>"),
        _row(Id="3", PostTypeId="2", ParentId="1", Score="10", Body="<p>Ten: <code>n! = n (n-1)!</code> &amp; 1! = 1.</p>"),
        _row(Id="4", PostTypeId="2", ParentId="1", Score="-1", Body="<p>Minus one: it just is.</p>"),
        _row(Id="5", PostTypeId="1", Score="0", Title="Unanswered question", Body="<p>Anyone?</p>"),
        _row(Id="6", PostTypeId="2", ParentId="99", Score="1", Body="<p>Answer to a deleted question.</p>"),
        _row(Id="7", PostTypeId="2", ParentId="1", Score="lots", Body="<p>Bad score.</p>"),
        _row(Id="8", PostTypeId="5", Body="<p>A tag wiki, not a question.</p>"),
    ]
    (root / "math.stackexchange.com").mkdir()
    (root / "math.stackexchange.com" / "Posts.xml").write_text(_posts(math) + "<!--" + " " * 4000 + "-->")
    broken = [_row(Id="1", PostTypeId="1", Score="2", Title="Before the cut", Body="<p>Complete.</p>"),
              '  <row Id="2" PostTypeId="2" Par']
    (root / "broken.stackexchange.com").mkdir()
    (root / "broken.stackexchange.com" / "Posts.xml").write_text(_posts(broken, close=False) + " " * 2000)
    tiny = [_row(Id="1", PostTypeId="1", Score="1", Title="Small site", Body="<p>Small.</p>")]
    (root / "tiny.stackexchange.com").mkdir()
    (root / "tiny.stackexchange.com" / "Posts.xml").write_text(_posts(tiny))


def test_answers_by_integer_score_and_site_selection(tmp_path: Path) -> None:
    root = tmp_path / "se"
    root.mkdir()
    _sites(root)
    rejects = str(tmp_path / "rejects")
    steps = stackexchange.build_steps([str(root)], {"top_sites": 2}, rejects_dir=rejects, name="stackexchange")
    result = run_local(steps, tmp_path)
    docs = {d["id"]: d for d in result["docs"]}
    assert set(docs) == {"math.stackexchange.com/1", "math.stackexchange.com/5", "broken.stackexchange.com/1"}
    assert docs["math.stackexchange.com/1"]["text"] == (
        "Why is 0! = 1?\n\nI do not see why.\n\nTen: n! = n (n-1)! & 1! = 1.\n\n"
        "Nine: the empty product.\n\nMinus one: it just is."
    )  # 10 before 9 (as strings "9" > "10" would put Nine first)
    assert docs["math.stackexchange.com/1"]["metadata"]["answer_scores"] == [10, 9, -1]
    assert docs["math.stackexchange.com/5"]["text"] == "Unanswered question\n\nAnyone?"
    assert docs["broken.stackexchange.com/1"]["text"] == "Before the cut\n\nComplete."
    reasons = {r["id"]: r["metadata"]["filter_reason"] for r in result["rejects"]}
    assert reasons == {
        "tiny.stackexchange.com": "site_not_selected",
        "math.stackexchange.com/6": "orphan_answer",
        "math.stackexchange.com/7": "malformed_post",
        str(root / "broken.stackexchange.com"): "malformed_xml",
    }
    reader = step_stats(result["stats"], "StackExchange")
    assert reader["documents"] == 3 and reader["dropped_malformed_xml"] == 1


def test_explicit_site_list_and_min_answers(tmp_path: Path) -> None:
    root = tmp_path / "se"
    root.mkdir()
    _sites(root)
    options = {"sites": ["math.stackexchange.com"], "min_answers": 1}
    result = run_local(stackexchange.build_steps([str(root)], options, rejects_dir=None, name="se"), tmp_path)
    assert [d["id"] for d in result["docs"]] == ["math.stackexchange.com/1"]
    reader = step_stats(result["stats"], "StackExchange")
    assert reader["dropped_site_not_selected"] == 2 and reader["dropped_too_few_answers"] == 1
