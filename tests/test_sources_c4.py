"""C4 source: line rules, page rules, 3-sentence span dedup, language ID, JSONL + WET input."""

from __future__ import annotations

import io
import json
from pathlib import Path

from datatrove.data import Document
from test_sources_common import run_local, step_stats

from llamalab.data.pipeline.sources import c4

GOOD = [
    "The committee met on Tuesday to discuss the new library building.",
    "Several residents asked whether the reading room would stay open late.",
    "The architect promised a final design before the end of the summer.",
]
FOOTER = [
    "Our newsletter arrives every Friday with local news and events.",
    "Subscribers can reply to any issue with questions for the editors.",
    "Thank you for supporting independent journalism in our town.",
]


def _filter(**overrides: object) -> c4.C4LineFilter:
    return c4.C4LineFilter({**c4.DEFAULTS, **overrides})


def test_split_sentences() -> None:
    assert c4.split_sentences('One is here. Two? "Three!" four\nFive.') == [
        "One is here.", "Two?", '"Three!"', "four", "Five."]


def test_line_rules_keep_only_clean_lines() -> None:
    page = "\n".join([
        "Home | About | Contact",  # no terminal punctuation
        GOOD[0],
        "Read more.",  # fewer than 5 words
        "Please enable JavaScript in your browser to see this page.",
        GOOD[1],
        "This site uses cookies to improve your experience, see below.",
        "By continuing you accept our Privacy Policy and all of its terms.",
        GOOD[2],
    ])
    doc = Document(text=page, id="p")
    line_filter = _filter()
    assert line_filter.filter(doc) is True
    assert doc.text == "\n".join(GOOD)
    assert line_filter.stats["lines_dropped_javascript"].total == 1
    assert line_filter.stats["lines_dropped_policy"].total == 2
    assert line_filter.stats["lines_dropped_too_few_words"].total == 1
    assert line_filter.stats["lines_dropped_no_terminal_punctuation"].total == 1


def test_page_rules() -> None:
    line_filter = _filter()
    lorem = Document(text="\n".join(GOOD) + "\nLorem ipsum dolor sit amet, consectetur adipiscing elit.", id="l")
    assert line_filter.filter(lorem) == (False, "lorem_ipsum")
    code = Document(text="\n".join(GOOD) + "\nfunction f() { return 1; } is shown here.", id="c")
    assert line_filter.filter(code) == (False, "curly_bracket")
    two = Document(text="\n".join(GOOD[:2]), id="t")
    assert line_filter.filter(two) == (False, "too_few_sentences")
    # three sentences on one line count as three
    one_line = Document(text=" ".join(GOOD), id="o")
    assert line_filter.filter(one_line) is True


def test_span_dedup_removes_a_repeated_footer() -> None:
    dedup = c4.SentenceSpanDedup(dict(c4.DEFAULTS))
    first = Document(text="\n".join(GOOD + FOOTER), id="a")
    other = [
        "A second article reports on the harvest festival this weekend.",
        "Farmers brought apples, pears and plums from the valley.",
        "Children painted pumpkins in the square all afternoon.",
    ]
    second = Document(text="\n".join(other + FOOTER), id="b")
    copy = Document(text="\n".join(FOOTER), id="c")
    out = list(dedup.run(iter([first, second, copy])))
    assert [d.id for d in out] == ["a", "b"]
    assert out[0].text == "\n".join(GOOD + FOOTER)  # first occurrence kept whole
    assert out[1].text == "\n".join(other)  # the footer span is gone from the second page
    assert dedup.stats["dropped_duplicate_spans"].total == 1


def _wet_bytes(url: str, text: str) -> bytes:
    from warcio.warcwriter import WARCWriter

    buffer = io.BytesIO()
    writer = WARCWriter(buffer, gzip=True)
    record = writer.create_warc_record(url, "conversion", payload=io.BytesIO(text.encode()),
                                       warc_headers_dict={"Content-Type": "text/plain"})
    writer.write_record(record)
    return buffer.getvalue()


def test_end_to_end_jsonl_and_wet(tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    french = ("Le conseil municipal s'est réuni mardi pour parler de la bibliothèque.\n"
              "Plusieurs habitants ont demandé si la salle de lecture resterait ouverte.\n"
              "L'architecte a promis un plan définitif avant la fin de l'été.")
    rows = [
        {"id": "en", "text": "Menu\n" + "\n".join(GOOD + FOOTER)},
        {"id": "fr", "text": french},
        {"id": "dup", "text": "\n".join(FOOTER)},
        {"id": "lorem", "text": "Lorem ipsum dolor sit amet. " * 5},
    ]
    (inputs / "pages.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    wet_text = "\n".join([
        "Tourists crowded the museum to see the restored medieval tapestries.",
        "Guides explained how the dyes had faded over six hundred years.",
        "The exhibition will travel to three other cities next spring.",
    ])
    (inputs / "crawl.warc.wet.gz").write_bytes(_wet_bytes("http://example.org/museum", wet_text))
    rejects = str(tmp_path / "rejects")
    result = run_local(c4.build_steps([str(inputs)], {}, rejects_dir=rejects, name="c4"), tmp_path)
    kept = {d["id"]: d for d in result["docs"]}
    assert sorted(kept) == ["en", next(i for i in kept if i != "en")]
    assert kept["en"]["text"] == "\n".join(GOOD + FOOTER)
    assert kept["en"]["metadata"]["language"] == "en"
    wet = next(d for i, d in kept.items() if i != "en")
    assert wet["text"] == wet_text and wet["metadata"]["url"] == "http://example.org/museum"
    reasons = {r["id"]: r["metadata"]["filter_reason"] for r in result["rejects"]}
    assert reasons["fr"] == "language_not_kept"
    assert reasons["dup"] == "duplicate_spans"
    assert reasons["lorem"] == "lorem_ipsum"
    assert "malformed_json" in reasons.values()
    assert step_stats(result["stats"], "Language")["dropped_language_not_kept"] == 1


def test_seen_set_is_per_task(tmp_path: Path) -> None:
    """With 2 tasks each file goes to one task: a span repeated across tasks survives in both."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(2):
        (inputs / f"{i}.jsonl").write_text(json.dumps({"id": f"d{i}", "text": "\n".join(GOOD)}) + "\n")
    opts = {"language_id": False}
    two_tasks = run_local(c4.build_steps([str(inputs)], opts, rejects_dir=None, name="c4"), tmp_path / "a", tasks=2)
    assert sorted(d["id"] for d in two_tasks["docs"]) == ["d0", "d1"]
    one_task = run_local(c4.build_steps([str(inputs)], opts, rejects_dir=None, name="c4"), tmp_path / "b")
    assert [d["id"] for d in one_task["docs"]] == ["d0"]
