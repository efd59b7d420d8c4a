"""GitHub source: licences, extension whitelist, header removal, RedPajama's code heuristics, MD5 dedup."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datatrove.data import Document
from test_sources_common import run_local, run_steps, step_stats

from llamalab.data.pipeline.sources import github

MIT = """MIT License

Copyright (c) 2024 Example Authors

Permission is hereby granted, free of charge, to any person obtaining a copy of this software
and associated documentation files (the "Software"), to deal in the Software without restriction,
including without limitation the rights to use, copy, modify, merge, publish, distribute...

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND.
"""
GPL = """                    GNU GENERAL PUBLIC LICENSE
                       Version 3, 29 June 2007

 Copyright (C) 2007 Free Software Foundation, Inc. <https://fsf.org/>
 Everyone is permitted to copy and distribute verbatim copies of this license document.
"""
BSD3 = """Redistribution and use in source and binary forms, with or without modification, are permitted
provided that the following conditions are met: ... 3. Neither the name of the copyright holder nor
the names of its contributors may be used to endorse or promote products derived from this software.
"""
APACHE = "                                 Apache License\n                           Version 2.0, January 2004\n"

PY_BODY = '''import os


def greet(name: str) -> str:
    """Say hello to someone by name."""
    return f"hello {name} from {os.getcwd()}"
'''
HEADER = "# Copyright (c) 2024 Example Authors\n# SPDX-License-Identifier: MIT\n\n"
MINIFIED_JS = "var a=function(b){return b*2};" * 60  # one 1,800-character line


def _write(root: Path, files: dict[str, str | bytes]) -> None:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)


@pytest.fixture()
def repos(tmp_path: Path) -> Path:
    root = tmp_path / "repos"
    _write(root / "mitlib", {
        "LICENSE": MIT,
        "src/hello.py": HEADER + PY_BODY,
        "copy/hello.py": HEADER + PY_BODY,  # the same file twice: one survives the MD5 dedup
        "README.md": "# mitlib\n\nA small library that says hello to people by name.\n",
        "dist/app.min.js": MINIFIED_JS,
        "logo.png": b"\x89PNG\r\n\x1a\n\x00\x00",
        "data/table.c": "int t[] = {" + ",\n".join(["0x1", "0x2", "0x3"] * 100) + "};\n",
        "bad.py": b"x = '\xff\xfe'\n",
    })
    (root / "mitlib" / "gone.py").symlink_to(root / "mitlib" / "missing.py")  # dangling: this file only
    _write(root / "gplapp", {"COPYING": GPL, "main.c": "int main(void) { return 0; }\n"})
    _write(root / "nolicense", {".git/HEAD": "ref: refs/heads/main\n", "run.sh": "echo hello world\n"})
    return root


def test_detect_license_by_wording() -> None:
    assert github.detect_license(MIT) == "MIT"
    assert github.detect_license(GPL) == "GPL-3.0"
    assert github.detect_license(BSD3) == "BSD-3-Clause"
    assert github.detect_license(BSD3.replace("Neither the name", "Also")) == "BSD-2-Clause"
    assert github.detect_license(APACHE) == "Apache-2.0"
    assert github.detect_license("All rights reserved. Do not copy.") == "unknown"
    # bundled third-party licences after the project's own do not decide (numpy, scipy, sklearn)
    assert github.detect_license(BSD3 + "\nThird-party code:\n" + GPL) == "BSD-3-Clause"
    assert github.detect_license("A. HISTORY OF THE SOFTWARE\n... GNU General Public License ...") == "PSF-2.0"
    isc = "Permission to use, copy, modify, and distribute this software for any purpose with or without fee"
    assert github.detect_license(isc) == "ISC"
    assert github.detect_license("Version 2.0, January 2004\nhttp://www.apache.org/licenses/") == "Apache-2.0"
    assert github.normalize_license("mit") == "MIT"
    assert github.normalize_license(["gpl-3.0"]) == "GPL-3.0"
    assert github.normalize_license("wtfpl") == "unknown"
    assert github.normalize_license(None) == ""


def test_primary_license_file_decides_then_dual_licences(tmp_path: Path) -> None:
    _write(tmp_path / "gpl_with_vendored_mit", {"COPYING": GPL, "LICENSE-vendored-lib": MIT})
    assert github.repository_license(str(tmp_path / "gpl_with_vendored_mit")) == "GPL-3.0"
    either = "Made available under either of the licenses in LICENSE.APACHE or LICENSE.BSD."
    _write(tmp_path / "dual", {"LICENSE": either, "LICENSE.APACHE": APACHE, "LICENSE.BSD": BSD3})
    assert github.repository_license(str(tmp_path / "dual")) == "Apache-2.0"
    assert github.repository_license(str(tmp_path)) == ""


def test_strip_license_header_keeps_shebang_and_docs() -> None:
    assert github.strip_license_header(HEADER + PY_BODY) == PY_BODY
    shebang = "#!/usr/bin/env python\n" + HEADER + PY_BODY
    assert github.strip_license_header(shebang) == "#!/usr/bin/env python\n" + PY_BODY
    c_file = "/*\n * Copyright 2020 ACME\n * Licensed under the MIT licence.\n */\n#include <stdio.h>\n"
    assert github.strip_license_header(c_file) == "#include <stdio.h>\n"
    # a leading comment that is not a notice is code documentation: kept
    doc_comment = "# Helpers to parse dates.\nimport re\n"
    assert github.strip_license_header(doc_comment) == doc_comment
    # an unterminated block comment is left alone
    assert github.strip_license_header("/* copyright\nint x;\n") == "/* copyright\nint x;\n"


def test_quality_thresholds_one_reason_each() -> None:
    opts = dict(github.DEFAULTS)
    quality = github.CodeQualityFilter(opts)
    cases = {
        "ok": PY_BODY,
        "max_line_length": "x = 1\n" + "a" * 1001 + "\n",
        "mean_line_length": ("b" * 150 + "\n") * 3,
        "alphanumeric_fraction": "{}[]();;;,,,...---+++ a1\n" * 5,
        "alpha_per_token": "x = [" + ",\n".join(str(i) for i in range(200)) + "]\n",
    }
    for reason, text in cases.items():
        result = quality.filter(Document(text=text, id=reason))
        assert result is True if reason == "ok" else result == (False, reason), reason


def test_tokens_are_words_and_punctuation_runs() -> None:
    quality = github.CodeQualityFilter(dict(github.DEFAULTS))
    assert quality.count_tokens("def foo(x):\n    return x**2") == 9  # def foo ( x ): return x ** 2


def test_repositories_end_to_end(repos: Path, tmp_path: Path) -> None:
    rejects = str(tmp_path / "rejects")
    steps = github.build_steps([str(repos)], {}, rejects_dir=rejects, name="github")
    result = run_local(steps, tmp_path)
    kept = {d["id"]: d for d in result["docs"]}
    assert set(kept) == {"mitlib/copy/hello.py", "mitlib/README.md"}  # copy/ < src/: the first is kept
    hello = kept["mitlib/copy/hello.py"]
    assert hello["text"] == PY_BODY  # header gone
    assert hello["metadata"]["license"] == "MIT"
    reasons = {r["id"]: r["metadata"]["filter_reason"] for r in result["rejects"]}
    assert reasons["mitlib/dist/app.min.js"] == "max_line_length"
    assert reasons["mitlib/logo.png"] == "extension"
    assert reasons["mitlib/bad.py"] == "bad_encoding"
    assert reasons["mitlib/gone.py"] == "unreadable_file"
    assert reasons["mitlib/data/table.c"] == "alpha_per_token"
    assert reasons["gplapp/main.c"] == "license_not_allowed"
    assert reasons["nolicense/run.sh"] == "license_none"
    assert reasons["mitlib/src/hello.py"] == "exact_duplicate"
    assert step_stats(result["stats"], "Licence")["dropped_license_not_allowed"] == 1
    assert step_stats(result["stats"], "Exact dedup")["dropped_exact_duplicate"] == 1
    gpl_reject = next(r for r in result["rejects"] if r["id"] == "gplapp/main.c")
    assert gpl_reject["metadata"]["license"] == "GPL-3.0"


def test_jsonl_records_with_license_metadata(tmp_path: Path) -> None:
    path = tmp_path / "files.jsonl"
    rows = [
        {"repo_name": "a/b", "path": "x.py", "content": PY_BODY, "license": "apache-2.0"},
        {"repo_name": "c/d", "path": "y.py", "content": PY_BODY + "\n# other\n", "license": "gpl-2.0"},
        {"repo_name": "e/f", "path": "z.txt", "content": "plain text", "license": "mit"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    reader = github.GitHubReader([str(path)], dict(github.DEFAULTS))
    license_filter = github.LicenseFilter(github.DEFAULTS["allowed_licenses"])
    out = run_steps([reader, license_filter])
    assert [d.id for d in out] == ["a/b/x.py"]
    assert out[0].metadata["license"] == "Apache-2.0"
    assert reader.stats["dropped_malformed_json"].total == 1
    assert reader.stats["dropped_extension"].total == 1
    assert license_filter.stats["dropped_license_not_allowed"].total == 1


def test_unknown_option_is_named() -> None:
    with pytest.raises(ValueError, match="max_line_lenght"):
        github.build_steps([], {"max_line_lenght": 5}, rejects_dir=None, name="github")
