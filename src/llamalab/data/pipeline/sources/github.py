"""GitHub: permissively licensed source files, cleaned and filtered as RedPajama-v1 did for LLaMA.

Input: directories of repositories (a directory holding a ``.git`` entry or a licence file at its
top is one repository, any other directory is a folder of repositories), or JSONL files with one
source file per line (``repo``/``repo_name``, ``path``, ``content``/``text``, ``license``).

Steps after the reader (which drops files outside the extension whitelist):

1. ``LicenseFilter``: keep MIT, BSD-2-Clause, BSD-3-Clause and Apache-2.0 repositories; the
   licence comes from the record's metadata or is detected in the LICENSE / COPYING file.
2. ``LicenseHeaderStrip``: remove a leading comment block that is a copyright / licence notice.
3. ``CodeQualityFilter``: drop files with max line length > 1000, mean line length > 100,
   alphanumeric fraction < 0.25, or fewer than 1.5 alphabetic characters per token.
4. Exact dedup on the MD5 of the content (the engine's ``ExactDedupFilter``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any

from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep

from ..readers import JsonlReader
from . import SourceFilter, list_units, resolve_options

# RedPajama-v1's GitHub whitelist (github_run_filter.py): names ending in one of these are kept.
REDPAJAMA_EXTENSIONS = [
    ".asm", ".bat", ".cmd", ".c", ".h", ".cs", ".cpp", ".hpp", ".c++", ".h++", ".cc", ".hh", ".C",
    ".H", ".cmake", ".css", ".dockerfile", ".f90", ".f", ".f03", ".f08", ".f77", ".f95", ".for",
    ".fpp", ".go", ".hs", ".html", ".java", ".js", ".jl", ".lua", ".md", ".markdown", ".php",
    ".php3", ".php4", ".php5", ".phps", ".phpt", ".pl", ".pm", ".pod", ".perl", ".ps1", ".psd1",
    ".psm1", ".py", ".rb", ".rs", ".sql", ".scala", ".sh", ".bash", ".command", ".zsh", ".ts",
    ".tsx", ".tex", ".vb", "Dockerfile", "Makefile", ".xml", ".rst", ".m", ".smali",
]  # fmt: skip

DEFAULTS: dict[str, Any] = {
    "extensions": REDPAJAMA_EXTENSIONS,
    "allowed_licenses": ["MIT", "BSD-2-Clause", "BSD-3-Clause", "Apache-2.0"],
    "strip_license_header": True,
    "max_line_length": 1000,
    "max_mean_line_length": 100.0,
    "min_alphanumeric_fraction": 0.25,
    "min_alpha_per_token": 1.5,
    # "regex": tokens are runs of word characters or runs of punctuation (``\w+|[^\w\s]+``), close
    # to a BPE pre-tokenizer; or the path of a Hugging Face ``tokenizer.json`` (RedPajama used the
    # GPT-NeoX tokenizer of pythia-6.9b-deduped, which we do not download).
    "tokenizer": "regex",
    "dedup": True,
    "max_file_bytes": 1_000_000,
    "text_field": "content",  # of JSONL records (BigQuery's and the Stack's name)
}

_LICENSE_FILE = re.compile(r"^(licen[cs]e|copying)([.-].*)?$", re.IGNORECASE)

# Metadata spellings (GitHub API keys, BigQuery's lowercase ids, free text) -> SPDX ids.
_LICENSE_ALIASES = {
    "mit": "MIT",
    "mit license": "MIT",
    "bsd-2-clause": "BSD-2-Clause",
    "bsd 2-clause": "BSD-2-Clause",
    "simplified bsd": "BSD-2-Clause",
    "bsd-3-clause": "BSD-3-Clause",
    "bsd 3-clause": "BSD-3-Clause",
    "new bsd": "BSD-3-Clause",
    "apache-2.0": "Apache-2.0",
    "apache 2.0": "Apache-2.0",
    "apache license 2.0": "Apache-2.0",
    "apache software license": "Apache-2.0",
    "gpl-2.0": "GPL-2.0",
    "gpl-3.0": "GPL-3.0",
    "lgpl-2.1": "LGPL-2.1",
    "lgpl-3.0": "LGPL-3.0",
    "agpl-3.0": "AGPL-3.0",
}


def normalize_license(value: Any) -> str:
    """An SPDX id for a metadata licence value (a string or a list of them); ``""`` for none."""
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        ids = [normalize_license(v) for v in value]
        return next((i for i in ids if i and i != "unknown"), ids[0] if ids else "")
    text = str(value).strip()
    if not text:
        return ""
    return _LICENSE_ALIASES.get(text.lower(), text if text in _LICENSE_ALIASES.values() else "unknown")


# Each licence's characteristic wording. A licence file often appends the licences of bundled
# third-party code (numpy's BSD file goes on to quote the GPL): the phrase found EARLIEST in the
# file names its own licence.
_LICENSE_PHRASES: list[tuple[str, str]] = [
    ("permission is hereby granted, free of charge", "MIT"),
    ("redistribution and use in source and binary forms", "BSD"),
    ("apache license", "Apache"),
    ("www.apache.org/licenses/", "Apache-2.0"),
    ("apache 2.0", "Apache-2.0"),
    ("apache-2.0", "Apache-2.0"),
    ("gnu affero general public license", "AGPL-3.0"),
    ("gnu lesser general public license", "LGPL"),
    ("gnu library general public license", "LGPL-2.1"),
    ("gnu general public license", "GPL"),
    ("mozilla public license", "MPL-2.0"),
    ("history of the software", "PSF-2.0"),
    ("python software foundation license", "PSF-2.0"),
    ("this license agreement is between", "PSF-2.0"),
    ("permission to use, copy, modify, and/or distribute this software for any purpose", "ISC"),
    ("permission to use, copy, modify, and distribute this software for any purpose", "ISC"),
    ("permission to use, copy, modify and distribute this software and its", "HPND"),
    ("the unlicense", "Unlicense"),
]


def detect_license(text: str) -> str:
    """The SPDX id of a licence file's text: the licence whose characteristic wording comes first.

    MIT, BSD-2/3/4-Clause, Apache-2.0, the GNU family, MPL-2.0, PSF-2.0, ISC, HPND and the
    Unlicense are recognised; anything else is "unknown".
    """
    t = " ".join(text.split()).lower()
    hits = [(t.find(phrase), spdx) for phrase, spdx in _LICENSE_PHRASES if phrase in t]
    if not hits:
        return "unknown"
    position, spdx = min(hits)
    window = t[position : position + 3000]  # the rest of this licence, for its version/variant
    if spdx == "BSD":
        if "all advertising materials" in window:
            return "BSD-4-Clause"
        if "neither the name" in window or "names of its contributors may not" in window:
            return "BSD-3-Clause"
        return "BSD-2-Clause"
    if spdx == "Apache":
        return "Apache-2.0" if "version 2.0" in window else "Apache-1.x"
    if spdx in ("GPL", "LGPL"):
        return f"{spdx}-3.0" if "version 3" in window[:300] else f"{spdx}-2.1" if spdx == "LGPL" else "GPL-2.0"
    return spdx


def is_repository(path: str) -> bool:
    """A directory is one repository if it has a ``.git`` entry or a licence file at its top."""
    try:
        names = os.listdir(path)
    except OSError:
        return False
    return ".git" in names or any(_LICENSE_FILE.match(n) for n in names)


_PRIMARY_LICENSE = re.compile(r"^(licen[cs]e|copying)(\.(md|txt|rst))?$", re.IGNORECASE)


def repository_license(repo: str) -> str:
    """The SPDX id of a repository's top-level LICENSE / COPYING file(s), ``""`` if it has none.

    The primary file (``LICENSE``, ``LICENSE.txt``, ``COPYING``...) decides when its licence is
    recognised; otherwise (e.g. "either LICENSE.APACHE or LICENSE.BSD") the first allowed licence
    among the other licence files, else the first one found.
    """
    primary: list[str] = []
    others: list[str] = []
    for candidate in (repo, os.path.join(repo, "licenses"), os.path.join(repo, "LICENSES")):
        if not os.path.isdir(candidate):
            continue
        for fname in sorted(os.listdir(candidate)):
            path = os.path.join(candidate, fname)
            if _LICENSE_FILE.match(fname) and os.path.isfile(path):
                with open(path, encoding="utf-8", errors="replace") as f:
                    spdx = detect_license(f.read(200_000))
                (primary if _PRIMARY_LICENSE.match(fname) else others).append(spdx)
    recognised = [spdx for spdx in primary if spdx != "unknown"]
    if recognised:
        return recognised[0]
    found = primary + others
    if not found:
        return ""
    return next((spdx for spdx in others if spdx in DEFAULTS["allowed_licenses"]), found[0])


class GitHubReader(JsonlReader):
    """Source files of repositories (directories) or JSONL records, one Document per file.

    Work units are repositories and JSONL files, sharded by rank. Files outside the extension
    whitelist, larger than ``max_file_bytes``, or not valid UTF-8 are rejected here with a reason
    (their rejects records carry the path, not the bytes).
    """

    name = "🐙 GitHub repositories"

    def __init__(self, inputs: list[str], options: dict[str, Any], **kwargs: Any):
        super().__init__(inputs, text_field=str(options["text_field"]), **kwargs)
        self.extensions = tuple(options["extensions"])
        self.max_bytes = int(options["max_file_bytes"])

    def units(self) -> list[str]:
        """Repositories (directories) and JSONL files, sorted."""
        return list_units(self.inputs, is_repository, (".jsonl", ".jsonl.gz", ".json"))

    def _keep_name(self, path: str, record_id: str, source: str) -> bool:
        if os.path.basename(path).endswith(self.extensions):
            return True
        self.reject_record(Document(text="", id=record_id, metadata={"path": path, "source_file": source}),
                           "extension")
        return False

    def read_unit(self, unit: str) -> Iterator[Document]:
        """The kept files of one repository or JSONL file."""
        if os.path.isdir(unit):
            yield from self._read_repository(unit)
        else:
            yield from self._read_jsonl(unit)

    def _read_repository(self, repo: str) -> Iterator[Document]:
        license_id = repository_license(repo)
        repo_name = os.path.basename(os.path.normpath(repo))
        for root, dirs, files in os.walk(repo):
            dirs[:] = sorted(d for d in dirs if d != ".git")
            for fname in sorted(files):
                full = os.path.join(root, fname)
                rel = os.path.relpath(full, repo)
                doc_id = f"{repo_name}/{rel}"
                if not self._keep_name(rel, doc_id, repo):
                    continue
                meta = {"repo": repo_name, "path": rel, "license": license_id}
                try:
                    if os.path.getsize(full) > self.max_bytes:
                        self.reject_record(Document(text="", id=doc_id, metadata=meta), "file_too_large")
                        continue
                    with open(full, "rb") as f:
                        raw = f.read()
                except OSError as e:  # a dangling symlink, a permission: this file only, not the repository
                    self.reject_record(Document(text="", id=doc_id, metadata={**meta, "error": str(e)}),
                                       "unreadable_file")
                    continue
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    self.reject_record(Document(text="", id=doc_id, metadata=meta), "bad_encoding")
                    continue
                if not text.strip():
                    self.reject_record(Document(text="", id=doc_id, metadata=meta), "empty")
                    continue
                yield Document(text=text, id=doc_id, metadata=meta)

    def _read_jsonl(self, path: str) -> Iterator[Document]:
        for doc in super().read_unit(path):
            meta = doc.metadata
            repo_name = str(meta.pop("repo_name", meta.get("repo", "")))
            file_path = str(meta.get("path", meta.pop("filename", "")))
            if repo_name or file_path:
                doc.id = f"{repo_name}/{file_path}"
            if not self._keep_name(file_path, doc.id, path):
                continue
            meta.update(repo=repo_name, path=file_path,
                        license=normalize_license(meta.pop("license", meta.pop("licenses", None))))
            yield doc


class LicenseFilter(SourceFilter):
    """Keep files of repositories whose licence is in the allowed list.

    Drop reasons: ``license_none`` (no licence file or field), ``license_unknown`` (not
    recognised), ``license_not_allowed`` (e.g. GPL-3.0; the id stays in ``metadata["license"]``).
    """

    name = "⚖️ Licence"

    def __init__(self, allowed: list[str], **kwargs: Any):
        super().__init__(step="license", **kwargs)
        self.allowed = frozenset(allowed)

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        """Keep the document when its repository's licence is allowed."""
        license_id = doc.metadata.get("license") or ""
        if license_id in self.allowed:
            return True
        if not license_id:
            return False, "license_none"
        if license_id == "unknown":
            return False, "license_unknown"
        return False, "license_not_allowed"


# Leading comment blocks, by syntax: runs of line comments, or one block comment.
_LINE_COMMENT = re.compile(r"^[ \t]*(#|//|--|;|%)")
_BLOCK_COMMENTS = [("/*", "*/"), ("<!--", "-->"), ("{-", "-}"), ("(*", "*)")]
_PROSE_EXTENSIONS = (".md", ".markdown", ".rst")
_NOTICE = re.compile(r"copyright|licen[cs]e|spdx-license-identifier|all rights reserved|\(c\)", re.IGNORECASE)


def _leading_comment(lines: list[str], start: int) -> int:
    """Index one past the comment block starting at ``lines[start]``, or ``start`` if none."""
    first = lines[start].lstrip()
    for open_mark, close_mark in _BLOCK_COMMENTS:
        if first.startswith(open_mark):
            for i in range(start, len(lines)):
                body = lines[i].lstrip()[len(open_mark):] if i == start else lines[i]
                if close_mark in body:
                    return i + 1
            return start  # unterminated: not a header, leave the file alone
    end = start
    while end < len(lines) and _LINE_COMMENT.match(lines[end]) and not lines[end].lstrip().startswith("#!"):
        end += 1
    return end


def strip_license_header(text: str) -> str:
    """Remove leading comment blocks that are copyright/licence notices.

    A shebang (``#!``) and an encoding line stay; blank lines between comment blocks are skipped;
    the first comment block that is not a notice (e.g. a module description) stops the stripping.
    """
    lines = text.split("\n")
    keep_prefix: list[str] = []
    i = 0
    while i < len(lines) and (lines[i].startswith("#!") or re.match(r"^#.*coding[:=]", lines[i])):
        keep_prefix.append(lines[i])
        i += 1
    stripped_any = False
    while True:
        j = i
        while j < len(lines) and not lines[j].strip():
            j += 1
        if j >= len(lines):
            break
        end = _leading_comment(lines, j)
        if end == j or not _NOTICE.search("\n".join(lines[j:end])):
            break
        i, stripped_any = end, True
    if not stripped_any:
        return text
    rest = lines[i:]
    while rest and not rest[0].strip():
        rest.pop(0)
    return "\n".join(keep_prefix + rest)


class LicenseHeaderStrip(SourceFilter):
    """Remove a leading copyright / licence comment; a file that was only a header is dropped."""

    name = "✂️ Licence header"

    def __init__(self, **kwargs: Any):
        super().__init__(step="license_header", **kwargs)

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        """Strip the header in place; drop (``only_license_header``) if nothing else is left."""
        if str(doc.metadata.get("path", "")).lower().endswith(_PROSE_EXTENSIONS):
            return True  # a "# License" heading in a README is content, not a comment
        text = strip_license_header(doc.text)
        if text != doc.text:
            self.stat_update("headers_removed")
            if not text.strip():
                return False, "only_license_header"
            doc.text = text
        return True


_REGEX_TOKEN = re.compile(r"\w+|[^\w\s]+")


class CodeQualityFilter(SourceFilter):
    """RedPajama's GitHub heuristics on the file's text (lines split on ``\\n``).

    Drop reasons: ``max_line_length``, ``mean_line_length``, ``alphanumeric_fraction``,
    ``alpha_per_token``. See ``DEFAULTS["tokenizer"]`` for what a token is.
    """

    name = "🧮 Code quality"

    def __init__(self, options: dict[str, Any], **kwargs: Any):
        super().__init__(step="code_quality", **kwargs)
        self.max_line = int(options["max_line_length"])
        self.max_mean = float(options["max_mean_line_length"])
        self.min_alnum = float(options["min_alphanumeric_fraction"])
        self.min_alpha_token = float(options["min_alpha_per_token"])
        self.tokenizer_spec = str(options["tokenizer"])
        self._tokenizer: Any = None

    def count_tokens(self, text: str) -> int:
        """Number of tokens in ``text`` under the configured tokenisation."""
        if self.tokenizer_spec == "regex":
            return len(_REGEX_TOKEN.findall(text))
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            if not os.path.isfile(self.tokenizer_spec):
                raise FileNotFoundError(f"github option tokenizer: {self.tokenizer_spec!r} is not 'regex' or a "
                                        f"tokenizer.json file")
            self._tokenizer = Tokenizer.from_file(self.tokenizer_spec)
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        """Keep the file when it passes all four thresholds."""
        text = doc.text
        if not text:
            return False, "empty"
        lengths = [len(line) for line in text.split("\n")]
        if max(lengths) > self.max_line:
            return False, "max_line_length"
        if sum(lengths) / len(lengths) > self.max_mean:
            return False, "mean_line_length"
        if sum(c.isalnum() for c in text) / len(text) < self.min_alnum:
            return False, "alphanumeric_fraction"
        tokens = self.count_tokens(text)
        if tokens == 0 or sum(c.isalpha() for c in text) / tokens < self.min_alpha_token:
            return False, "alpha_per_token"
        return True


def build_steps(
    inputs: list[str], options: dict[str, Any], *, rejects_dir: str | None, name: str
) -> list[PipelineStep]:
    """Reader + licence filter + header strip + quality filter + MD5 exact dedup."""
    from ..common import ExactDedupFilter

    opts = resolve_options(DEFAULTS, options, name)
    common = {"rejects_dir": rejects_dir, "name": name}
    steps: list[PipelineStep] = [
        GitHubReader(inputs, opts, **common),
        LicenseFilter(list(opts["allowed_licenses"]), **common),
    ]
    if opts["strip_license_header"]:
        steps.append(LicenseHeaderStrip(**common))
    steps.append(CodeQualityFilter(opts, **common))
    if opts["dedup"]:
        steps.append(ExactDedupFilter(algorithm="md5", step="md5_dedup", **common))
    return steps
