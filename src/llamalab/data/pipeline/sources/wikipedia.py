"""Wikipedia: MediaWiki XML dumps (``*-pages-articles.xml.bz2``) to plain-text articles.

The reader streams each dump (bz2 decompression + ``xml.etree.ElementTree.iterparse``, one page
in memory at a time) and reads the language from the dump's ``siteinfo/dbname`` (``enwiki`` ->
``en``) or, failing that, the file name. Steps after it:

1. ``WikiPageFilter``: articles only (namespace 0), redirects skipped.
2. ``WikitextToText``: markup removed with ``mwparserfromhell``: templates, tables, references,
   comments, math, galleries, file/image links, categories and interlanguage links go;
   ``[[target|label]]`` -> label, ``[url label]`` -> label, bold/italic marks dropped, headings
   kept as lines of text, list markers dropped.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any
from xml.etree.ElementTree import iterparse

from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep

from . import SourceFilter, SourceReader, list_input_files, open_binary, resolve_options

# The 20 languages of the LLaMA paper's Wikipedia subset.
LLAMA_LANGUAGES = ["bg", "ca", "cs", "da", "de", "en", "es", "fr", "hr", "hu",
                   "it", "nl", "pl", "pt", "ro", "ru", "sl", "sr", "sv", "uk"]  # fmt: skip

DEFAULTS: dict[str, Any] = {
    "languages": LLAMA_LANGUAGES,
    "namespaces": [0],
    "skip_redirects": True,
    # Tag contents removed with the tag; other tags (b, i, sub, span, ...) keep their text.
    "drop_tags": ["ref", "references", "table", "gallery", "math", "chem", "ce", "timeline", "imagemap",
                  "score", "graph", "templatedata", "syntaxhighlight", "source", "mapframe", "maplink"],
    # Link prefixes always treated as files or categories, besides the dump's own namespace names.
    "media_prefixes": ["file", "image", "media", "category"],
    "min_chars": 1,
}

_MEDIA_SUFFIX = re.compile(r"\.(jpe?g|png|gif|svg|tiff?|webp|ogg|ogv|oga|webm|mp3|mp4|wav|flac|pdf|djvu)$",
                           re.IGNORECASE)
# An interlanguage link's prefix: a language code ("fr", "zh-min-nan", "simple").
_INTERLANGUAGE = re.compile(r"^([a-z]{2,3}(-[a-z]+)*|simple)$")
_MAGIC_WORD = re.compile(r"__[A-Z]+__")
_REDIRECT = re.compile(r"^\s*#redirect", re.IGNORECASE)


def dump_language(dbname: str | None, path: str) -> str:
    """The language code of a dump: from ``dbname`` (``dewiki``), else the file name (``dewiki-2023...``)."""
    for candidate in (dbname or "", os.path.basename(path)):
        match = re.match(r"^([a-z_]+?)wiki\b", candidate)
        if match:
            return match.group(1).replace("_", "-")
    return "unknown"


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


class WikipediaReader(SourceReader):
    """Pages of MediaWiki XML dumps (``.xml``, ``.xml.bz2``, ``.xml.gz``), streamed.

    Each page becomes a Document with its raw wikitext and ``title``, ``namespace``,
    ``redirect``, ``language`` and ``url`` metadata; the dump's File/Category namespace names are
    kept in ``metadata["media_prefixes"]`` for the markup step. A dump in a language not listed is
    rejected whole (``language_not_selected``).
    """

    name = "📚 MediaWiki XML dump"

    def __init__(self, inputs: list[str], languages: list[str] | None, **kwargs: Any):
        super().__init__(inputs, **kwargs)
        self.languages = frozenset(languages) if languages else None  # empty: every language

    def units(self) -> list[str]:
        """The XML dumps of the inputs."""
        return list_input_files(self.inputs, (".xml", ".xml.bz2", ".xml.gz", ".xml.xz"))

    def read_unit(self, unit: str) -> Iterator[Document]:
        """Stream one dump, yielding a Document per page."""
        with open_binary(unit) as f:
            context = iterparse(f, events=("start", "end"))
            _event, root = next(context)
            dbname: str | None = None
            media: list[str] = []
            language = None
            for event, elem in context:
                if event != "end":
                    continue
                tag = _local(elem.tag)
                if tag == "dbname":
                    dbname = (elem.text or "").strip()
                elif tag == "namespace" and elem.get("key") in ("-2", "6", "14") and elem.text:
                    media.append(elem.text.strip().lower())
                elif tag == "page":
                    if language is None:
                        language = dump_language(dbname, unit)
                        if self.languages is not None and language not in self.languages:
                            self.reject_record(Document(text="", id=unit, metadata={"language": language}),
                                               "language_not_selected")
                            return
                    yield self._page(elem, language, media, unit)
                    root.clear()  # drop the finished page: memory stays one page

    @staticmethod
    def _page(page: Any, language: str, media: list[str], unit: str) -> Document:
        fields: dict[str, Any] = {"redirect": False}
        text = ""
        for child in page.iter():
            tag = _local(child.tag)
            if tag in ("title", "ns") and tag not in fields:
                fields[tag] = (child.text or "").strip()
            elif tag == "id" and "id" not in fields:
                fields["id"] = (child.text or "").strip()
            elif tag == "redirect":
                fields["redirect"] = True
            elif tag == "text":
                text = child.text or ""
        title = fields.get("title", "")
        namespace = int(fields["ns"]) if fields.get("ns", "").lstrip("-").isdigit() else 0
        return Document(
            text=text,
            id=f"{language}wiki/{fields.get('id') or title}",
            metadata={
                "title": title,
                "namespace": namespace,
                "redirect": fields["redirect"] or bool(_REDIRECT.match(text)),
                "language": language,
                "url": f"https://{language}.wikipedia.org/wiki/{title.replace(' ', '_')}",
                "media_prefixes": media,
                "source_file": os.path.basename(unit),
            },
        )


class WikiPageFilter(SourceFilter):
    """Articles only: other namespaces (``not_article_namespace``) and redirects (``redirect``) dropped."""

    name = "📄 Wikipedia articles"

    def __init__(self, namespaces: list[int], skip_redirects: bool, **kwargs: Any):
        super().__init__(step="pages", **kwargs)
        self.namespaces = frozenset(int(n) for n in namespaces)
        self.skip_redirects = skip_redirects

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        """Keep articles that are not redirects."""
        if doc.metadata.get("namespace", 0) not in self.namespaces:
            return False, "not_article_namespace"
        if self.skip_redirects and doc.metadata.get("redirect"):
            return False, "redirect"
        return True


def _is_hidden_link(title: str, media_prefixes: frozenset[str]) -> bool:
    """Whether a wikilink shows no text in the article: a file, a category, an interlanguage link."""
    if title.startswith(":"):  # [[:Category:X|...]] is a visible link to the category page
        return False
    if ":" not in title:
        return False
    prefix = title.split(":", 1)[0].strip().lower()
    return prefix in media_prefixes or bool(_INTERLANGUAGE.match(prefix)) or bool(_MEDIA_SUFFIX.search(title))


def _clean(code: Any, drop_tags: frozenset[str], media_prefixes: frozenset[str]) -> None:
    """Remove the invisible nodes of a parsed wikitext in place, recursively."""
    import mwparserfromhell.nodes as n

    kept = []
    for node in code.nodes:
        if isinstance(node, n.Template | n.Comment | n.Argument):
            continue
        if isinstance(node, n.Tag):
            tag = str(node.tag).strip().lower()
            if tag in drop_tags:
                continue
            if tag == "br":
                kept.append(n.Text("\n"))
                continue
            if node.contents is not None:
                _clean(node.contents, drop_tags, media_prefixes)
        elif isinstance(node, n.Wikilink):
            if _is_hidden_link(str(node.title).strip(), media_prefixes):
                continue
            if node.text is not None:
                _clean(node.text, drop_tags, media_prefixes)
        elif isinstance(node, n.ExternalLink) and node.title is not None:
            _clean(node.title, drop_tags, media_prefixes)
        elif isinstance(node, n.Heading):
            _clean(node.title, drop_tags, media_prefixes)
        kept.append(node)
    code.nodes = kept


def wikitext_to_text(wikitext: str, *, drop_tags: list[str] | None = None,
                     media_prefixes: list[str] | None = None) -> str:
    """Plain text of a wikitext article (see the module docstring for what is kept and removed)."""
    import mwparserfromhell

    drop = frozenset(t.lower() for t in (DEFAULTS["drop_tags"] if drop_tags is None else drop_tags))
    media = frozenset(p.lower() for p in (DEFAULTS["media_prefixes"] if media_prefixes is None else media_prefixes))
    code = mwparserfromhell.parse(wikitext)
    _clean(code, drop, media)
    text = _MAGIC_WORD.sub("", code.strip_code(normalize=True, collapse=True))
    lines = [" ".join(line.split()) for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


class WikitextToText(SourceFilter):
    """Replace the wikitext by plain text; drop pages with less than ``min_chars`` left (``empty_after_markup``)."""

    name = "🧹 Wikitext to text"

    def __init__(self, options: dict[str, Any], **kwargs: Any):
        super().__init__(step="wikitext", **kwargs)
        self.drop_tags = list(options["drop_tags"])
        self.media_prefixes = list(options["media_prefixes"])
        self.min_chars = int(options["min_chars"])

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        """Convert the text in place."""
        prefixes = self.media_prefixes + list(doc.metadata.pop("media_prefixes", []))
        text = wikitext_to_text(doc.text, drop_tags=self.drop_tags, media_prefixes=prefixes)
        if len(text) < self.min_chars:
            return False, "empty_after_markup"
        doc.text = text
        return True


def build_steps(
    inputs: list[str], options: dict[str, Any], *, rejects_dir: str | None, name: str
) -> list[PipelineStep]:
    """Dump reader + article filter + wikitext-to-text."""
    opts = resolve_options(DEFAULTS, options, name)
    common = {"rejects_dir": rejects_dir, "name": name}
    return [
        WikipediaReader(inputs, opts["languages"], **common),
        WikiPageFilter(list(opts["namespaces"]), bool(opts["skip_redirects"]), **common),
        WikitextToText(opts, **common),
    ]
