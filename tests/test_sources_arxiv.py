"""ArXiv source: main-file choice, \\input inlining, comments, macros, body between section and bibliography."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from test_sources_common import run_local, step_stats

from llamalab.data.pipeline.sources import arxiv

PAPER = r"""\documentclass{article}
\usepackage{amsmath}
\newcommand{\model}{LLaMA}
\newcommand*\R{\mathbb{R}}
\def\eps{\varepsilon}
\newcommand{\norm}[1]{\lVert #1 \rVert}
\title{On \model}
\begin{document}
\maketitle
\begin{abstract}Abstract text before the first section.\end{abstract}
% a whole-line comment
\section{Introduction}
We train \model{} on 5\% of the data. % an inline comment
Error below \eps, vectors in \R^n, and \norm{x}.\\% comment after a line break
\input{sections/method}
\paragraph{Note} Still kept.
\bibliography{refs}
\end{document}
"""
METHOD = r"""\subsection{Method}
The \model\ recipe.% comment right after a word
"""
EXPECTED = r"""\section{Introduction}
We train LLaMA{} on 5\% of the data. 
Error below \varepsilon, vectors in \mathbb{R}^n, and \norm{x}.\\
\subsection{Method}
The LLaMA\ recipe.

\paragraph{Note} Still kept."""


def test_remove_comments_keeps_escaped_percent_and_the_char_before() -> None:
    assert arxiv.remove_comments("a 5\\% b % c") == "a 5\\% b "
    assert arxiv.remove_comments("word% c") == "word"  # RedPajama's pattern ate the "d"
    assert arxiv.remove_comments("x\\\\% c") == "x\\\\"  # after a line break "%" starts a comment
    assert arxiv.remove_comments("a\n   % whole line\nb") == "a\nb"
    assert arxiv.remove_comments("a\n\\begin{comment}\nhidden\n\\end{comment}\nb") == "a\n\nb"


def test_expand_macros() -> None:
    text = r"\newcommand{\a}{alpha}\def\b{\a-beta}\newcommand{\f}[1]{(#1)} \a, \b, \ab, \f{x}"
    assert arxiv.expand_macros(text) == r"\newcommand{\f}[1]{(#1)} alpha, alpha-beta, \ab, \f{x}"
    nested = r"\newcommand{\v}{\mathbf{v}_{\text{\{i\}}}}\v"
    assert arxiv.expand_macros(nested) == r"\mathbf{v}_{\text{\{i\}}}"
    assert arxiv.expand_macros(r"\def\loop{\loop}\loop", max_passes=3) == r"\loop"  # no infinite loop


def test_sectioning_commands_each_alone() -> None:
    for command in ("part", "chapter", "section", "subsection", "subsubsection", "paragraph", "subparagraph"):
        assert arxiv.cut_body(f"preamble\n\\{command}{{X}} body") == f"\\{command}{{X}} body", command
    assert arxiv.cut_body("\\section*{A} text \\appendix more") == "\\section*{A} text"
    assert arxiv.cut_body("\\section{A} x \\begin{thebibliography}{9} y") == "\\section{A} x"
    assert arxiv.cut_body("no sections at all") is None


def _tar_gz(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_papers_end_to_end(tmp_path: Path) -> None:
    papers = tmp_path / "papers"
    (papers / "2301.00001" / "sections").mkdir(parents=True)
    (papers / "2301.00001" / "paper.tex").write_text(PAPER)
    (papers / "2301.00001" / "sections" / "method.tex").write_text(METHOD)
    (papers / "2301.00001" / "macros.tex").write_text("\\newcommand{\\unused}{x}\n")  # not a main file
    archive = _tar_gz({"ms.tex": PAPER.replace("\\input{sections/method}", "\\input sections/method"),
                       "sections/method.tex": METHOD})
    (papers / "2301.00002.tar.gz").write_bytes(archive)
    (papers / "2301.00003.tar.gz").write_bytes(archive[: len(archive) // 2])  # truncated
    (papers / "2301.00004.tex").write_text("\\documentclass{article}\\begin{document}Only an abstract.\\end{document}")
    (papers / "2301.00005.tex").write_bytes("\\documentclass{article}\\begin{document}\\section{Caf\xe9}x".encode("latin-1"))
    rejects = str(tmp_path / "rejects")
    result = run_local(arxiv.build_steps([str(papers)], {}, rejects_dir=rejects, name="arxiv"), tmp_path)
    docs = {d["id"]: d for d in result["docs"]}
    assert docs["2301.00001"]["text"] == EXPECTED
    assert docs["2301.00001"]["metadata"]["main_file"] == "paper.tex"
    assert docs["2301.00002"]["text"] == EXPECTED
    assert docs["2301.00005"]["text"] == "\\section{Café}x"
    reasons = {r["id"]: r["metadata"]["filter_reason"] for r in result["rejects"]}
    assert reasons[str(papers / "2301.00003.tar.gz")] == "truncated_or_corrupt_archive"
    assert reasons["2301.00004"] == "no_sectioning_command"
    assert step_stats(result["stats"], "arXiv cleaning")["dropped_no_sectioning_command"] == 1
