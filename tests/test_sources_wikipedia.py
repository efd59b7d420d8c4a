"""Wikipedia source: streamed XML dumps, articles only, wikitext to plain text, bad dumps rejected."""

from __future__ import annotations

import bz2
from pathlib import Path
from xml.sax.saxutils import escape

from test_sources_common import run_local, step_stats

from llamalab.data.pipeline.sources import wikipedia

ARTICLE = """{{Infobox river|name=Seine|length=777 km}}
'''Paris''' is the ''capital'' of [[France]].<ref name="a">Cited {{cite web|url=http://x}}</ref> It lies on [[Seine|a river]].
<!-- editors: keep this short -->
== History ==
The city grew in the [[Middle Ages]].<ref name="a"/>
* Visit [http://example.org the official site].
[[File:Paris.jpg|thumb|The [[Eiffel Tower]] at night]]
[[Datei:Karte.png|mini|Karte]]
{| class="wikitable"
! Year !! Population
|-
| 1900 || 2.7M
|}
Water is H<sub>2</sub>O.<math>E = mc^2</math>
__NOTOC__
[[Category:Capitals in Europe]]
[[fr:Paris]]
"""
EXPECTED = """Paris is the capital of France. It lies on a river.

History
The city grew in the Middle Ages.
Visit the official site.

Water is H2O."""


def _dump(dbname: str, pages: list[tuple[int, int, str, str, bool]]) -> bytes:
    """A MediaWiki export: (id, ns, title, wikitext, redirect) per page."""
    body = []
    for page_id, ns, title, text, redirect in pages:
        body.append(
            f"<page><title>{escape(title)}</title><ns>{ns}</ns><id>{page_id}</id>"
            + (f'<redirect title="{escape(text)}" />' if redirect else "")
            + f'<revision><id>{page_id * 10}</id><text xml:space="preserve">{escape(text)}</text></revision></page>'
        )
    return (
        '<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" xml:lang="en">'
        f"<siteinfo><sitename>Wikipedia</sitename><dbname>{dbname}</dbname><namespaces>"
        '<namespace key="0" case="first-letter" /><namespace key="6" case="first-letter">File</namespace>'
        '<namespace key="14" case="first-letter">Category</namespace></namespaces></siteinfo>'
        + "".join(body) + "</mediawiki>"
    ).encode()


def test_wikitext_to_text_each_construct() -> None:
    assert wikipedia.wikitext_to_text(ARTICLE) == EXPECTED


def test_hidden_and_visible_links() -> None:
    media = frozenset(wikipedia.DEFAULTS["media_prefixes"])
    assert wikipedia._is_hidden_link("Category:X", media)
    assert wikipedia._is_hidden_link("de:Paris", media)
    assert wikipedia._is_hidden_link("Bild:Karte.svg", media)  # an alias we do not list: the suffix tells
    assert not wikipedia._is_hidden_link(":Category:X", media)
    assert not wikipedia._is_hidden_link("Star Wars: A New Hope", media)


def test_dump_language() -> None:
    assert wikipedia.dump_language("dewiki", "x.xml") == "de"
    assert wikipedia.dump_language(None, "/d/svwiki-20240101-pages-articles.xml.bz2") == "sv"
    assert wikipedia.dump_language("zh_min_nanwiki", "x") == "zh-min-nan"


def test_dumps_end_to_end(tmp_path: Path) -> None:
    inputs = tmp_path / "dumps"
    inputs.mkdir()
    en = _dump("enwiki", [
        (1, 0, "Paris", ARTICLE, False),
        (2, 0, "Paname", "#REDIRECT [[Paris]]", True),
        (3, 1, "Talk:Paris", "Should the infobox list the population? ~~~~", False),
        (4, 0, "Empty stub", "{{stub}}", False),
    ])
    (inputs / "enwiki-20240101-pages-articles.xml.bz2").write_bytes(bz2.compress(en))
    (inputs / "jawiki-20240101-pages-articles.xml").write_bytes(_dump("jawiki", [(5, 0, "東京", "東京は首都。", False)]))
    # ~600 kB in 100 kB bz2 blocks, cut in the middle: the blocks before the cut still decompress
    long_dump = _dump("frwiki", [(10 + i, 0, f"Page {i}", f"Texte de la page {i}. " * 120, False) for i in range(200)])
    packed = bz2.compress(long_dump, compresslevel=1)
    (inputs / "frwiki-20240101-pages-articles.xml.bz2").write_bytes(packed[: len(packed) // 2])
    (inputs / "dewiki-broken.xml").write_bytes(b"<mediawiki><siteinfo><dbname>dewiki</dbname></siteinfo><page><ti")

    rejects = str(tmp_path / "rejects")
    result = run_local(wikipedia.build_steps([str(inputs)], {}, rejects_dir=rejects, name="wikipedia"), tmp_path)
    docs = {d["id"]: d for d in result["docs"]}
    assert docs["enwiki/1"]["text"] == EXPECTED
    assert docs["enwiki/1"]["metadata"]["url"] == "https://en.wikipedia.org/wiki/Paris"
    assert docs["enwiki/1"]["metadata"]["language"] == "en"
    assert "media_prefixes" not in docs["enwiki/1"]["metadata"]
    # the truncated French dump: the pages before the cut are kept, then the file is a reject
    french = [d for i, d in docs.items() if i.startswith("frwiki/")]
    assert 0 < len(french) < 200
    assert set(docs) == {"enwiki/1", *(d["id"] for d in french)}

    reasons = {r["id"]: r["metadata"]["filter_reason"] for r in result["rejects"]}
    assert reasons["enwiki/2"] == "redirect"
    assert reasons["enwiki/3"] == "not_article_namespace"
    assert reasons["enwiki/4"] == "empty_after_markup"
    assert reasons[str(inputs / "jawiki-20240101-pages-articles.xml")] == "language_not_selected"
    assert reasons[str(inputs / "frwiki-20240101-pages-articles.xml.bz2")] == "truncated_or_corrupt_archive"
    assert reasons[str(inputs / "dewiki-broken.xml")] == "malformed_xml"
    reader = step_stats(result["stats"], "MediaWiki")
    assert reader["dropped_truncated_or_corrupt_archive"] == 1 and reader["dropped_malformed_xml"] == 1
    assert step_stats(result["stats"], "Wikipedia articles")["dropped_redirect"] == 1
