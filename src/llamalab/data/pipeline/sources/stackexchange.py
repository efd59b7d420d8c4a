"""StackExchange: one document per question, its answers after it by decreasing score.

Input: a directory of sites (``math.stackexchange.com/Posts.xml``, ...) or site directories,
from the Internet Archive dump once its ``.7z`` files are extracted; ``Posts.xml`` may also be
``.gz`` / ``.bz2``. The 28 largest sites (by the size of their Posts file) are kept, or the
``sites`` listed. Each Posts file is streamed with ``iterparse``; a document is the question's
title, its body, then its answers sorted by ``Score`` as integers (10 before 9), highest first,
all HTML turned into text with ``inscriptis``.

Memory: questions and answers of one site are grouped in memory until its file ends (answers
may come long after their question), so the largest site bounds the memory of a task.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any
from xml.etree.ElementTree import ParseError, iterparse

from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep

from . import SourceReader, open_binary, resolve_options

DEFAULTS: dict[str, Any] = {
    "top_sites": 28,
    "sites": [],  # explicit site names (directory names); overrides top_sites when given
    "min_answers": 0,
}

_POSTS_NAMES = ("Posts.xml", "Posts.xml.gz", "Posts.xml.bz2")


def posts_file(site_dir: str) -> str | None:
    """The Posts file of a site directory, or None."""
    for name in _POSTS_NAMES:
        path = os.path.join(site_dir, name)
        if os.path.isfile(path):
            return path
    return None


def select_sites(site_dirs: list[str], top: int, names: list[str]) -> set[str]:
    """The site directories to keep: those named in ``names``, else the ``top`` largest Posts files."""
    if names:
        wanted = set(names)
        return {d for d in site_dirs if os.path.basename(d) in wanted}
    by_size = sorted(site_dirs, key=lambda d: (-os.path.getsize(posts_file(d) or d), d))
    return set(by_size[:top])


def html_text(html: str) -> str:
    """Visible text of a post body (the engine's inscriptis-based converter)."""
    from ..readers import html_to_text

    return html_to_text(html) if html else ""


class StackExchangeReader(SourceReader):
    """Questions with their answers, one Document per question, from each kept site.

    Reject reasons: ``site_not_selected`` (one record per site), ``malformed_post`` (a Score,
    Id or ParentId that is not an integer), ``orphan_answer`` (its question is not in the file),
    ``too_few_answers``; a broken Posts file is rejected by the base reader (its questions read
    so far are still emitted).
    """

    name = "💬 StackExchange Posts.xml"

    def __init__(self, inputs: list[str], options: dict[str, Any], **kwargs: Any):
        super().__init__(inputs, **kwargs)
        self.top = int(options["top_sites"])
        self.names = list(options["sites"])
        self.min_answers = int(options["min_answers"])
        self._selected: set[str] | None = None

    def units(self) -> list[str]:
        """Site directories (an input holding a Posts file is one site), sorted."""
        sites: set[str] = set()
        for item in self.inputs:
            if not os.path.isdir(item):
                raise FileNotFoundError(f"stackexchange input {item!r}: expected a directory of sites or a site")
            if posts_file(item):
                sites.add(item)
            else:
                sites.update(e.path for e in os.scandir(item) if e.is_dir() and posts_file(e.path))
        return sorted(sites)

    def read_unit(self, unit: str) -> Iterator[Document]:
        """The question documents of one site, if it is selected."""
        if self._selected is None:
            self._selected = select_sites(self.units(), self.top, self.names)
        site = os.path.basename(os.path.normpath(unit))
        if unit not in self._selected:
            self.reject_record(Document(text="", id=site, metadata={"site": site}), "site_not_selected")
            return
        questions: dict[int, dict[str, str]] = {}
        answers: dict[int, list[tuple[int, int, str]]] = {}
        try:
            self._collect(posts_file(unit), site, questions, answers)
        except ParseError:
            yield from self._documents(site, questions, answers)  # keep what was read, then reject the file
            raise
        yield from self._documents(site, questions, answers)

    def _collect(self, path: str, site: str, questions: dict[int, dict[str, str]],
                 answers: dict[int, list[tuple[int, int, str]]]) -> None:
        with open_binary(path) as f:
            for _event, elem in iterparse(f, events=("end",)):
                if elem.tag != "row":
                    continue
                attrs = dict(elem.attrib)
                elem.clear()
                kind = attrs.get("PostTypeId")
                if kind not in ("1", "2"):
                    continue
                try:
                    post_id = int(attrs["Id"])
                    score = int(attrs.get("Score", "0"))
                    parent = int(attrs["ParentId"]) if kind == "2" else 0
                except (KeyError, ValueError):
                    self.reject_record(Document(text=attrs.get("Body", ""), id=f"{site}/{attrs.get('Id', '?')}",
                                                metadata={"site": site, "attributes": {k: v for k, v in attrs.items()
                                                                                       if k != "Body"}}),
                                       "malformed_post")
                    continue
                if kind == "1":
                    questions[post_id] = {"title": attrs.get("Title", ""), "body": attrs.get("Body", ""),
                                          "score": str(score)}
                else:
                    answers.setdefault(parent, []).append((score, post_id, attrs.get("Body", "")))

    def _documents(self, site: str, questions: dict[int, dict[str, str]],
                   answers: dict[int, list[tuple[int, int, str]]]) -> Iterator[Document]:
        for parent in sorted(set(answers) - set(questions)):
            for _score, answer_id, body in answers.pop(parent):
                self.reject_record(Document(text=html_text(body), id=f"{site}/{answer_id}",
                                            metadata={"site": site, "parent_id": parent}), "orphan_answer")
        for qid in sorted(questions):
            question = questions.pop(qid)
            # highest score first; equal scores keep the older (smaller id) answer first
            ranked = sorted(answers.pop(qid, []), key=lambda a: (-a[0], a[1]))
            doc_id = f"{site}/{qid}"
            parts = [question["title"].strip(), html_text(question["body"])]
            parts += [html_text(body) for _score, _aid, body in ranked]
            doc = Document(text="\n\n".join(p for p in parts if p), id=doc_id,
                           metadata={"site": site, "question_id": qid, "question_score": int(question["score"]),
                                     "answer_scores": [a[0] for a in ranked]})
            if len(ranked) < self.min_answers:
                self.reject_record(doc, "too_few_answers")
                continue
            yield doc


def build_steps(
    inputs: list[str], options: dict[str, Any], *, rejects_dir: str | None, name: str
) -> list[PipelineStep]:
    """The Posts.xml reader (site selection, question + sorted answers, HTML to text)."""
    opts = resolve_options(DEFAULTS, options, name)
    return [StackExchangeReader(inputs, opts, rejects_dir=rejects_dir, name=name)]
