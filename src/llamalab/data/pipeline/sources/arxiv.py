"""ArXiv: LaTeX sources of papers cleaned as LLaMA did (the text stays LaTeX).

Input: a ``.tex`` file, a directory holding one paper's files, a directory of papers (sub-
directories, ``.tar``/``.tar.gz``/``.tgz`` archives, ``.tex`` or gzipped ``.gz`` single files), or
such archives directly. The reader picks each paper's main file (the one with ``\\documentclass``
and ``\\begin{document}``), removes comments from every file, and inlines ``\\input`` /
``\\include`` of files that exist. Steps after it (``ArxivCleaner``):

- argument-free ``\\newcommand{\\x}{...}``, ``\\renewcommand``, ``\\def\\x{...}`` macros are expanded
  inline and their definitions removed (macros with arguments are left alone);
- everything before the first sectioning command (``\\part``, ``\\chapter``, ``\\section``,
  ``\\subsection``, ``\\subsubsection``, ``\\paragraph``, ``\\subparagraph``) is dropped, and
  everything from the bibliography (``\\begin{thebibliography}``, ``\\bibliography{...}``) or
  ``\\appendix`` on.

Two bugs of RedPajama's cleaner are avoided: its sectioning pattern lacked a ``|`` between
``paragraph`` and ``subparagraph`` (so neither matched alone), and its inline-comment pattern
consumed the character before the ``%``.
"""

from __future__ import annotations

import gzip
import os
import re
import tarfile
from collections.abc import Iterator
from typing import Any

from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep

from . import SourceFilter, SourceReader, list_input_files, list_units, resolve_options

DEFAULTS: dict[str, Any] = {
    "expand_macros": True,
    "cut_before_first_section": True,
    "cut_bibliography_and_appendix": True,
    "max_input_depth": 10,
    "max_macro_passes": 5,
}

_SECTION = re.compile(r"\\(?:part|chapter|section|subsection|subsubsection|paragraph|subparagraph)\*?\s*[\[{]")
_TAIL = re.compile(r"\\begin\{thebibliography\}|\\bibliography\{|\\printbibliography\b|\\appendix\b"
                   r"|\\end\{document\}")
_INPUT = re.compile(r"\\(?:input|include)\s*(?:\{([^}]*)\}|\s([^\s\\{}]+))")
_ARCHIVES = (".tar", ".tar.gz", ".tgz")


def remove_comments(text: str) -> str:
    """Remove LaTeX comments: whole comment lines go, an inline ``%`` cuts the rest of its line.

    A ``%`` escaped by a backslash (``\\%``) is text; after ``\\\\`` (a line break) it is a comment
    again. The character before the ``%`` is kept. ``comment`` environments are removed too.
    """
    text = re.sub(r"\\begin\{comment\}.*?\\end\{comment\}", "", text, flags=re.DOTALL)
    out: list[str] = []
    for line in text.split("\n"):
        if line.lstrip().startswith("%"):
            continue
        i = 0
        while i < len(line):
            if line[i] == "\\":
                i += 2  # an escaped character, "%" included
                continue
            if line[i] == "%":
                line = line[:i]
                break
            i += 1
        out.append(line)
    return "\n".join(out)


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """The content of the balanced ``{...}`` group opening at ``text[start]`` and the index after it."""
    if start >= len(text) or text[start] != "{":
        return None
    depth = 0
    i = start
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i], i + 1
        i += 1
    return None


# \newcommand{\x}, \newcommand*\x, \renewcommand..., \def\x: the macro name in group 1, 2 or 3.
_DEFINITION = re.compile(r"\\(?:(?:re)?newcommand\*?\s*(?:\{\s*(\\[A-Za-z@]+)\s*\}|(\\[A-Za-z@]+))"
                         r"|def\s*(\\[A-Za-z@]+))\s*")


def expand_macros(text: str, max_passes: int = 5) -> str:
    """Expand argument-free macro definitions inline and remove the definitions.

    A definition with parameters (``[1]`` after a ``\\newcommand``, ``#1`` after a ``\\def``) is left
    where it is, as are its uses. Expansion repeats (macros using macros) up to ``max_passes``.
    """
    macros: dict[str, str] = {}
    pieces: list[str] = []
    pos = 0
    for match in _DEFINITION.finditer(text):
        if match.start() < pos:
            continue  # inside a definition already consumed
        name = match.group(1) or match.group(2) or match.group(3)
        group = _braced(text, match.end())
        if group is None:  # parameters ("[1]", "#1") or an unbraced body: not ours to expand
            continue
        macros[name] = group[0]
        pieces.append(text[pos : match.start()])
        pos = group[1]
    pieces.append(text[pos:])
    text = "".join(pieces)
    if not macros:
        return text
    pattern = re.compile("|".join(re.escape(n) + r"(?![A-Za-z@])" for n in sorted(macros, key=len, reverse=True)))
    for _ in range(max_passes):
        expanded = pattern.sub(lambda m: macros[m.group(0)], text)
        if expanded == text:
            break
        text = expanded
    return text


def cut_body(text: str, *, before_section: bool = True, tail: bool = True) -> str | None:
    """The text from the first sectioning command up to the bibliography / appendix; None if no section."""
    if before_section:
        first = _SECTION.search(text)
        if first is None:
            return None
        text = text[first.start():]
    if tail:
        end = _TAIL.search(text)
        if end is not None:
            text = text[: end.start()]
    return text.strip()


def decode_tex(raw: bytes) -> str:
    """A TeX file's text: UTF-8, else Latin-1 (older arXiv sources), which never fails."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def pick_main(files: dict[str, str]) -> str | None:
    """The main file: has ``\\begin{document}`` (and ideally ``\\documentclass``); the largest wins a tie."""
    candidates = [name for name, text in files.items() if name.endswith(".tex") and "\\begin{document}" in text]
    if not candidates:
        return None
    return max(candidates, key=lambda n: ("\\documentclass" in files[n], len(files[n]), n))


def inline_inputs(name: str, files: dict[str, str], depth: int, seen: tuple[str, ...] = ()) -> str:
    """``files[name]`` with ``\\input`` / ``\\include`` of existing files replaced by their text."""
    base = os.path.dirname(name)

    def replace(match: re.Match[str]) -> str:
        target = (match.group(1) or match.group(2) or "").strip()
        for candidate in (target, target + ".tex"):
            path = os.path.normpath(os.path.join(base, candidate))
            if path in files and path not in seen and depth > 0:
                return inline_inputs(path, files, depth - 1, (*seen, name))
        return match.group(0)

    return _INPUT.sub(replace, files[name])


class ArxivReader(SourceReader):
    """One Document per paper: the main file, comments removed, inputs inlined.

    A paper without a main file is rejected (``no_main_tex``); a broken archive is rejected by
    the base reader (``truncated_or_corrupt_archive``).
    """

    name = "📐 arXiv LaTeX"

    def __init__(self, inputs: list[str], max_depth: int, **kwargs: Any):
        super().__init__(inputs, **kwargs)
        self.max_depth = max_depth

    def units(self) -> list[str]:
        """Papers: .tex files, archives, and directories holding one paper's .tex files."""
        return list_units(self.inputs, _is_one_paper, (*_ARCHIVES, ".tex", ".gz"))

    def _files(self, unit: str) -> dict[str, bytes]:
        """The TeX-like files of a paper (figures and PDFs are never read)."""
        if os.path.isdir(unit):
            found = {}
            for path in list_input_files([unit]):
                name = os.path.relpath(path, unit)
                if _is_tex_like(name):
                    with open(path, "rb") as f:
                        found[name] = f.read()
            return found
        if unit.endswith(_ARCHIVES) or (unit.endswith(".gz") and _is_tar_gz(unit)):
            with tarfile.open(unit) as tar:
                return {os.path.normpath(m.name): tar.extractfile(m).read() for m in tar.getmembers()
                        if m.isfile() and _is_tex_like(m.name)}
        opener = gzip.open if unit.endswith(".gz") else open
        with opener(unit, "rb") as f:
            return {"main.tex": f.read()}

    def read_unit(self, unit: str) -> Iterator[Document]:
        """The paper of one unit."""
        files = {name: decode_tex(raw) for name, raw in self._files(unit).items()}
        main = pick_main(files)
        paper_id = os.path.basename(unit.rstrip("/"))
        for suffix in (*_ARCHIVES, ".gz", ".tex"):
            paper_id = paper_id.removesuffix(suffix)
        if main is None:
            self.reject_record(Document(text="", id=paper_id, metadata={"source_file": unit}), "no_main_tex")
            return
        cleaned = {name: remove_comments(text) for name, text in files.items()}
        text = inline_inputs(main, cleaned, self.max_depth)
        yield Document(text=text, id=paper_id, metadata={"main_file": main, "source_file": unit})


def _is_tex_like(name: str) -> bool:
    """TeX sources and the files \\input may name without an extension."""
    return name.endswith((".tex", ".bbl", ".sty", ".cls")) or "." not in os.path.basename(name)


def _is_one_paper(folder: str) -> bool:
    """A directory is one paper if it holds .tex files, no archives, and at most one main file.

    Otherwise it is a folder of papers (sub-directories, archives, single-file papers).
    """
    names = os.listdir(folder)
    if any(n.endswith((*_ARCHIVES, ".gz")) for n in names):
        return False
    mains = 0
    for name in names:
        path = os.path.join(folder, name)
        if name.endswith(".tex") and os.path.isfile(path):
            with open(path, "rb") as f:
                mains += b"\\begin{document}" in f.read()
    return mains <= 1 and any(n.endswith(".tex") for n in names)


def _is_tar_gz(path: str) -> bool:
    try:
        with tarfile.open(path, "r:gz"):
            return True
    except tarfile.ReadError:
        return False


class ArxivCleaner(SourceFilter):
    """Expand simple macros and keep the body between the first section and the bibliography.

    Drop reasons: ``no_sectioning_command`` and ``empty_after_cleaning``.
    """

    name = "🧽 arXiv cleaning"

    def __init__(self, options: dict[str, Any], **kwargs: Any):
        super().__init__(step="latex", **kwargs)
        self.options = options

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        """Clean the LaTeX in place."""
        text = doc.text
        if self.options["expand_macros"]:
            text = expand_macros(text, int(self.options["max_macro_passes"]))
        body = cut_body(text, before_section=bool(self.options["cut_before_first_section"]),
                        tail=bool(self.options["cut_bibliography_and_appendix"]))
        if body is None:
            return False, "no_sectioning_command"
        if not body:
            return False, "empty_after_cleaning"
        doc.text = body
        return True


def build_steps(
    inputs: list[str], options: dict[str, Any], *, rejects_dir: str | None, name: str
) -> list[PipelineStep]:
    """Paper reader + LaTeX cleaning."""
    opts = resolve_options(DEFAULTS, options, name)
    common = {"rejects_dir": rejects_dir, "name": name}
    return [ArxivReader(inputs, int(opts["max_input_depth"]), **common), ArxivCleaner(opts, **common)]
