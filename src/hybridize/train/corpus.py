"""A distillation corpus from real text that ships offline, in several domains, with one whole source held out.

A student distilled on one kind of text learns that text, not its teacher: healed on Python and kernel docs alone,
the SmolLM2 hybrid was 4.4x worse than its teacher on other domains. `build_corpus` draws on many distinct sources
that Debian packages ship (technical docs, source code, manuals, a dictionary, legal texts, scripture, novels,
humour), cuts each into documents of reasonable size, and writes:

    OUT/train.jsonl     {"text", "source", "id"} per line, every selected source but the holdout
    OUT/val.jsonl       the same sources, the documents whose split hash falls under --val-fraction
    OUT/holdout.jsonl   every document of the --holdout source (a generalization test: none of it is in train/val)
    OUT/manifest.json   per source: package versions, root, files read, documents and characters per split

The split is a hash of (seed, source, document id), so it does not depend on the machine, the order of reading or
the other sources; each file is ordered by the same hash, so any prefix of val.jsonl or holdout.jsonl (which
`hybridize eval --max-tokens` reads) mixes all sources and all parts of a book. The same inputs give byte-identical
files. A source is one small reader in `SOURCES`; its default root is where Debian installs it, and `roots`
points it elsewhere (used by the tests, and for docs unpacked by hand).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from ..errors import HybridizeError

MIN_CHARS = 200  # shorter documents (stub files, empty pages) are dropped
MAX_CHARS = 60_000  # longer ones are cut at blank lines: a whole manual is not one document
GROUP_CHARS = 8_000  # small items (fortunes, dictionary entries, short chapters) are grouped up to about this size
SPLIT_RULE = ("sha256(f'{seed}\\0{source}\\0{id}') as a fraction of 2**256 < val_fraction -> val, else train; "
              "the holdout source goes whole to holdout; each file is ordered by the same hash")


@dataclass
class CorpusConfig:
    """`hybridize corpus`'s flags, 1:1."""

    sources: list[str] | None = None  # None = every known source present on this machine
    holdout: str | None = None  # a source written whole to holdout.jsonl and kept out of train/val
    val_fraction: float = 0.01
    max_mb_per_source: float | None = None  # millions of characters kept per source (a hash-chosen subset)
    seed: int = 0
    roots: dict[str, str] = field(default_factory=dict)  # source name -> folder to read it from instead
    force: bool = False


@dataclass(frozen=True)
class Doc:
    """One document of a source: `id` is stable across machines (a relative path, a chapter name)."""

    id: str
    text: str
    file: str  # what it was read from, relative to the source's root (for the manifest)


# ------------------------------------------------------------------------------------------------------ text helpers


_OVERSTRIKE = re.compile(r".\x08")  # nroff bold/underline ("X\bX", "_\bX") as in fortunes and man output


def clean(text: str) -> str:
    """Normalised newlines, no overstrike, no trailing spaces, at most one blank line in a row."""
    text = _OVERSTRIKE.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def cut(text: str, max_chars: int = MAX_CHARS) -> list[str]:
    """`text` in pieces of at most ~max_chars, cut at blank lines (at line ends when a paragraph is longer)."""
    if len(text) <= max_chars:
        return [text]
    pieces, current, size = [], [], 0
    for para in re.split(r"\n\n+", text):
        blocks = [para] if len(para) <= max_chars else para.split("\n")  # a giant paragraph: cut at lines
        for block in blocks:
            if current and size + len(block) > max_chars:
                pieces.append("\n\n".join(current))
                current, size = [], 0
            current.append(block)
            size += len(block) + 2
    if current:
        pieces.append("\n\n".join(current))
    return pieces


def group(items: Iterable[tuple[str, str]], target: int = GROUP_CHARS, sep: str = "\n\n") -> Iterator[tuple[str, str]]:
    """Consecutive (label, text) items joined until each group has >= target characters; label 'first..last'."""
    labels: list[str] = []
    texts: list[str] = []
    size = 0
    for label, text in items:
        labels.append(label)
        texts.append(text)
        size += len(text)
        if size >= target:
            yield _span(labels), sep.join(texts)
            labels, texts, size = [], [], 0
    if texts:
        yield _span(labels), sep.join(texts)


def _span(labels: list[str]) -> str:
    return labels[0] if len(labels) == 1 else f"{labels[0]}..{labels[-1]}"


def split_at(text: str, heading: re.Pattern) -> list[tuple[str, str]]:
    """(heading line, section text) for each line matching `heading`; text before the first one is ('', text)."""
    out: list[tuple[str, str]] = []
    title, lines = "", []
    for line in text.split("\n"):
        if heading.match(line):
            if any(s.strip() for s in lines):
                out.append((title, "\n".join(lines)))
            title, lines = " ".join(line.split()), []
        lines.append(line)
    if any(s.strip() for s in lines):
        out.append((title, "\n".join(lines)))
    return out


def unwrap(text: str) -> str:
    """Hard-wrapped prose as one line per paragraph (how prose appears on the web, which teachers learned from)."""
    return "\n\n".join(" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip())


def read_text(path: Path) -> str:
    """A file's text, gunzipped when it ends in .gz/.dz (dictzip is gzip); undecodable bytes replaced."""
    raw = gzip.open(path).read() if path.suffix in (".gz", ".dz") else path.read_bytes()
    return raw.decode("utf-8", errors="replace")


def _files(root: Path, patterns: Iterable[str], skip: Callable[[str], bool] = lambda rel: False) -> list[Path]:
    """Regular files under root matching any glob, sorted by relative path (never the filesystem's order)."""
    found = {p for pattern in patterns for p in root.glob(pattern) if p.is_file() and not p.is_symlink()}
    return sorted((p for p in found if not skip(p.relative_to(root).as_posix())), key=lambda p: p.relative_to(root))


def _file_docs(root: Path, patterns: Iterable[str], skip: Callable[[str], bool] = lambda rel: False,
               convert: Callable[[str], str] = lambda t: t) -> Iterator[Doc]:
    for path in _files(root, patterns, skip):
        rel = path.relative_to(root).as_posix()
        yield Doc(rel, convert(read_text(path)), rel)


def _run(cmd: list[str], what: str) -> str:
    """stdout of a helper program (bible, Rscript, man), or a one-line error naming it."""
    try:
        done = subprocess.run(cmd, capture_output=True, stdin=subprocess.DEVNULL, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise HybridizeError(f"{what}: could not run {cmd[0]}: {e}") from None
    if done.returncode != 0:
        err = " ".join(done.stderr.decode(errors="replace").split())[:200]
        raise HybridizeError(f"{what}: {' '.join(cmd[:2])} ... failed with status {done.returncode}: {err}")
    return done.stdout.decode("utf-8", errors="replace")


# -------------------------------------------------------------------------------------------------------- HTML → text


class _HTMLText(HTMLParser):
    """Visible text of an HTML page: navigation, head, scripts dropped; blocks as paragraphs; <pre> verbatim."""

    BLOCKS = {"p", "div", "section", "article", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "table", "blockquote",
              "ul", "ol", "dl", "li", "dt", "dd", "tr", "br", "hr", "title"}
    SKIP_TAGS = {"head", "script", "style", "nav", "noscript"}
    SKIP_CLASSES = {"docnav", "navheader", "navfooter", "toc", "indexterm"}
    SKIP_IDS = {"banner", "title"}
    VOID = {"br", "hr", "img", "meta", "link", "input", "area", "base", "col", "wbr", "source"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip: list[str] = []  # tag names of open skipped elements (the first one decides when skipping ends)
        self.pre = 0
        self.line_start = True  # collapsed text at the start of a line loses its leading space; <pre> text does not

    def handle_starttag(self, tag: str, attrs) -> None:
        attrs = dict(attrs)
        if self.skip:
            if tag == self.skip[0] and tag not in self.VOID:
                self.skip.append(tag)
            return
        classes = set((attrs.get("class") or "").split())
        if tag in self.SKIP_TAGS or classes & self.SKIP_CLASSES or attrs.get("id") in self.SKIP_IDS:
            if tag not in self.VOID:
                self.skip.append(tag)
            return
        if tag == "pre":
            self.pre += 1
        if tag in self.BLOCKS:
            self.parts.append("\n\n" if tag not in ("br", "li", "tr", "dt", "dd") else "\n")
            self.line_start = True

    def handle_startendtag(self, tag: str, attrs) -> None:
        self.handle_starttag(tag, attrs)  # <br/>: never opens an element

    def handle_endtag(self, tag: str) -> None:
        if self.skip:
            if tag == self.skip[0]:
                self.skip.pop()
            return
        if tag == "pre":
            self.pre = max(0, self.pre - 1)
        if tag in self.BLOCKS:
            self.parts.append("\n\n")
            self.line_start = True

    def handle_data(self, data: str) -> None:
        if self.skip:
            return
        if not self.pre:
            data = re.sub(r"\s+", " ", data)
            data = data.lstrip() if self.line_start else data
        if data:
            self.parts.append(data)
            self.line_start = data.endswith("\n")


def html_to_text(html: str) -> str:
    """The readable text of an HTML page, with the standard library's parser (no extra dependency)."""
    parser = _HTMLText()
    parser.feed(html)
    parser.close()
    return clean("".join(parser.parts))


# ----------------------------------------------------------------------------------------------------------- readers


def read_python_docs(root: Path) -> Iterator[Doc]:
    """CPython's documentation as reStructuredText sources (Sphinx `_sources`)."""
    yield from _file_docs(root, ["**/*.rst.txt"])


def read_linux_docs(root: Path) -> Iterator[Doc]:
    """The kernel's Documentation/ tree (reST and plain text, mostly gzipped)."""
    yield from _file_docs(root, ["**/*.rst.gz", "**/*.txt.gz", "**/*.rst", "**/*.txt"])


def read_cpython_stdlib(root: Path) -> Iterator[Doc]:
    """The standard library's Python source, without its test suites and site-packages."""
    def skip(rel: str) -> bool:
        folders = rel.split("/")[:-1]
        return any(f.startswith("test") or f.endswith("_test") or f.endswith("-packages") for f in folders)

    yield from _file_docs(root, ["*.py", "*/**/*.py"], skip)


def read_html_book(root: Path) -> Iterator[Doc]:
    """A book as one HTML page per section (the Debian Administrator's Handbook, the maintainers' guide)."""
    yield from _file_docs(root, ["*.html"], convert=html_to_text)


_DEBREF_HEADING = re.compile(r"^(Preface$|Chapter\s\d+\.\s|Appendix\s[A-Z]\.\s|\d+\.\d+\.\s\S)")  # \s: NBSP in the body


def read_debian_reference(root: Path) -> Iterator[Doc]:
    """Debian Reference's plain-text edition, one document per numbered section (table of contents dropped)."""
    for path in _files(root, ["debian-reference.en.txt.gz", "debian-reference.en.txt"])[:1]:
        rel = path.relative_to(root).as_posix()
        sections = split_at(read_text(path), _DEBREF_HEADING)
        body = [s for s in sections if s[0]]
        prefaces = [i for i, (t, _) in enumerate(body) if t == "Preface"]
        body = body[prefaces[-1]:] if prefaces else body  # the first "Preface" line is the table of contents
        for label, text in group(body, target=MIN_CHARS * 5):
            yield Doc(f"{rel}#{label}", text, rel)


def read_sphinx_and_html(root: Path) -> Iterator[Doc]:
    """Debian's developer guides: the Developer's Reference (reST sources) and the New Maintainers' Guide (HTML)."""
    yield from _file_docs(root, ["developers-reference/_sources/*.rst.txt"])
    yield from _file_docs(root, ["doc/maint-guide/html/*.en.html"], convert=html_to_text)


_TEXINFO_HEADING = re.compile(r"^(\d+(\.\d+)*|Appendix [A-Z](\.\d+)*|Index) \S")


def read_texinfo_text(root: Path) -> Iterator[Doc]:
    """Texinfo manuals rendered as plain text (GNU Coding Standards, Information for Maintainers of GNU Software),
    one document per numbered section: a section heading is a numbered line underlined with * = - or ."""
    for path in _files(root, ["*.text.gz", "*.txt.gz", "*.text", "*.txt"]):
        rel = path.relative_to(root).as_posix()
        lines = read_text(path).split("\n")
        underlined = {i for i in range(len(lines) - 1)
                      if _TEXINFO_HEADING.match(lines[i]) and re.fullmatch(r"[*=.-]{3,}", lines[i + 1].strip())}
        marker = "\x00"  # mark headings (the same numbered line also appears, un-underlined, in the contents)
        text = "\n".join(marker + line if i in underlined else line for i, line in enumerate(lines))
        sections = [(t.lstrip(marker) or "front", s.replace(marker, "")) for t, s in split_at(text, re.compile(marker))]
        for label, part in group(sections, target=MIN_CHARS * 5):
            yield Doc(f"{rel}#{label}", part, rel)


_JARGON_PART = re.compile(r"^(Chapter \d+\.|Appendix [A-Z]\.|Glossary$|Bibliography$)")
_JARGON_ENTRY = re.compile(r"^   :[^:]+:")


def read_jargon(root: Path) -> Iterator[Doc]:
    """The Jargon File: its chapters and appendices, and its lexicon in groups of consecutive entries (the
    glossary's bare list of entry names is dropped)."""
    for path in _files(root, ["jargon.txt.gz", "jargon.txt"])[:1]:
        rel = path.relative_to(root).as_posix()
        for title, text in split_at(read_text(path), _JARGON_PART):
            if title != "Glossary":
                yield Doc(f"{rel}#{title or 'front'}", text, rel)
                continue
            entries = split_at(text, _JARGON_ENTRY)[1:]  # [0] is the list of names
            for label, part in group((t.strip(": ").split(":")[0], s) for t, s in entries):
                yield Doc(f"{rel}#{label}", part, rel)


def read_fortunes(root: Path) -> Iterator[Doc]:
    """fortune(6) files: entries separated by '%' lines, grouped into documents of about GROUP_CHARS characters
    within each file, in the files' own format."""
    files = [p for p in _files(root, ["*"]) if "." not in p.name and p.with_name(p.name + ".dat").exists()]
    for path in files:
        rel = path.relative_to(root).as_posix()
        entries = [e.strip("\n") for e in re.split(r"(?m)^%\n", read_text(path) + "\n")]
        numbered = [(str(i), e) for i, e in enumerate(entries) if e.strip()]
        for label, part in group(numbered, sep="\n%\n"):
            yield Doc(f"{rel}#{label}", part, rel)


_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}
_DICT_TAG_LINE = re.compile(r"^\s*\[[^\]\n]{1,40}\]\s*$", re.M)  # "[1913 Webster]", "[PJC]": provenance tags


def _b64(text: str) -> int:
    value = 0
    for c in text:
        value = value * 64 + _B64[c]
    return value


def read_dictd(root: Path, name: str) -> Iterator[Doc]:
    """A dictd database (NAME.index + NAME.dict.dz): entries in file order, grouped; the 00-database-* header
    entries dropped except the dictionary's own preface (00-database-info)."""
    index = root / f"{name}.index"
    data_path = root / f"{name}.dict.dz"
    data = gzip.open(data_path).read() if data_path.exists() else (root / f"{name}.dict").read_bytes()
    spans: dict[tuple[int, int], str] = {}
    for line in index.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) >= 3:
            span = (_b64(parts[1]), _b64(parts[2]))
            key = parts[0].replace("-", "")  # header entries: 00databaseurl, 00-database-long, 00-gcide-url, ...
            if not key.startswith("00") or key.endswith("info"):
                spans.setdefault(span, parts[0])
    entries = [(head, _DICT_TAG_LINE.sub("", data[o:o + n].decode("utf-8", errors="replace")).strip("\n"))
               for (o, n), head in sorted(spans.items())]
    for label, part in group(entries):
        yield Doc(f"{name}#{label}", part, data_path.name)


_BIBLE_CHAPTER = re.compile(r"^(?:[1-3] )?[A-Z][A-Za-z ]+ \d+$")


def parse_bible(text: str) -> list[tuple[str, str]]:
    """`bible -l0` output ("Genesis 1", blank, "  1 In the beginning ...") as (chapter, text) pairs, the verse
    numbers kept at the start of each verse's line."""
    chapters = split_at(text, _BIBLE_CHAPTER)
    return [(title, "\n".join(line.strip() for line in body.strip().split("\n") if line.strip()))
            for title, body in chapters if title]


def read_bible(root: Path) -> Iterator[Doc]:
    """The King James Bible, decoded from bible-kjv-text's compressed /usr/lib/bible.data by bible-kjv's `bible`
    program (the only reader of that format), one document per chapter, short chapters grouped."""
    text = _run(["bible", "-p", str(root), "-l0", "Gen1:1-Rev22:21"], "bible")
    for label, part in group(parse_bible(text), target=MIN_CHARS * 10):
        yield Doc(label, part, "bible.data")


_NOVEL_CHAPTER = re.compile(r"^(CHAPTER|Chapter) [0-9IVXLC]+\.?\s*$")
_AUSTEN_R = ('library(janeaustenr, lib.loc = commandArgs(TRUE)[1]); d <- austen_books(); '
             'for (b in levels(d$book)) { cat("\\f", b, "\\n", sep = ""); '
             'writeLines(enc2utf8(as.character(d$text[d$book == b]))) }')


def parse_novels(text: str) -> Iterator[tuple[str, str]]:
    """Books separated by form feeds ("\\fTitle" lines) as (title #chapter, unwrapped chapter text)."""
    for block in text.split("\f")[1:]:
        title, _, body = block.partition("\n")
        for i, (heading, chapter) in enumerate(split_at(body, _NOVEL_CHAPTER)):
            yield f"{title.strip()} #{i:03d} {heading or 'front'}", unwrap(chapter)


def read_austen(root: Path) -> Iterator[Doc]:
    """Jane Austen's six novels (r-cran-janeaustenr; R's data format, so read through Rscript), one document per
    chapter, unwrapped to one line per paragraph."""
    text = _run(["Rscript", "--vanilla", "-e", _AUSTEN_R, str(root.parent)], "austen")
    for label, chapter in parse_novels(text):
        yield Doc(label, chapter, "data/Rdata.rdb")


def _man_is_page(path: Path) -> bool:
    """False for '.so other.2' stubs: aliases whose text is another page's."""
    head = read_text(path)[:400].lstrip()
    return not head.startswith(".so ") and "\n.so " not in "\n" + head[:80]


def render_man(path: Path) -> str:
    """A man page as a reader sees it: man-db's rendering, 80 columns, no hyphenation or justification."""
    env = {**os.environ, "MANWIDTH": "80", "LC_ALL": "C.UTF-8", "MAN_KEEP_FORMATTING": ""}
    env.pop("MAN_KEEP_FORMATTING")
    done = subprocess.run(["man", "--no-hyphenation", "--no-justification", "-l", str(path)], env=env,
                          capture_output=True, stdin=subprocess.DEVNULL, timeout=120)
    return done.stdout.decode("utf-8", errors="replace") if done.returncode == 0 else ""


_MAN_SECTIONS = re.compile(r"^man[23457]/[^/]+\.[23457]\.gz$")  # the Linux man-pages project's sections


def read_man_pages(root: Path) -> Iterator[Doc]:
    """Sections 2-5 and 7 of the manual (system calls, C library, devices, file formats, overviews), rendered
    by man-db in parallel; alias stubs and other packages' 3pm/3ssl pages skipped."""
    pages = [p for p in _files(root, ["man[23457]/*.gz"], lambda rel: not _MAN_SECTIONS.match(rel))
             if _man_is_page(p)]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for path, text in zip(pages, pool.map(render_man, pages), strict=True):
            rel = path.relative_to(root).as_posix()
            yield Doc(rel, text, rel)


def read_licenses(root: Path) -> Iterator[Doc]:
    """The licence texts every Debian system carries (GPL, LGPL, Apache, MPL, GFDL, Artistic, BSD, CC0)."""
    yield from _file_docs(root, ["*"])


# ---------------------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Source:
    """A known text source: where Debian installs it, which packages provide it, and its reader."""

    name: str
    domain: str
    packages: tuple[str, ...]
    root: str  # default folder; a glob picks the newest version (e.g. /usr/lib/python3.*)
    read: Callable[[Path], Iterator[Doc]]
    probe: str = ""  # a path under root that must exist ("" = root itself)
    commands: tuple[str, ...] = ()  # programs the reader runs
    description: str = ""


def _version_key(path: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


SOURCES: dict[str, Source] = {s.name: s for s in [
    Source("python-docs", "technical docs", ("python3.11-doc",), "/usr/share/doc/python3.*/html/_sources",
           read_python_docs, description="CPython documentation (reST)"),
    Source("linux-docs", "technical docs", ("linux-doc",), "/usr/share/doc/linux-doc/Documentation",
           read_linux_docs, description="Linux kernel Documentation/"),
    Source("cpython-stdlib", "source code", ("libpython3.11-stdlib",), "/usr/lib/python3.[0-9]*",
           read_cpython_stdlib, probe="os.py", description="Python standard library source"),
    Source("man-pages", "technical reference", ("manpages", "manpages-dev", "man-db"), "/usr/share/man",
           read_man_pages, probe="man7/man-pages.7.gz", commands=("man",),
           description="manual sections 2-5, 7 rendered by man-db"),
    Source("debian-handbook", "technical book", ("debian-handbook",), "/usr/share/doc/debian-handbook/html/en-US",
           read_html_book, probe="index.html", description="The Debian Administrator's Handbook (HTML)"),
    Source("debian-reference", "technical book", ("debian-reference-en",), "/usr/share/debian-reference",
           read_debian_reference, probe="debian-reference.en.txt.gz", description="Debian Reference (text)"),
    Source("debian-dev-guides", "technical guides", ("developers-reference", "maint-guide"), "/usr/share",
           read_sphinx_and_html, probe="developers-reference/_sources/index.rst.txt",
           description="Developer's Reference (reST), New Maintainers' Guide (HTML)"),
    Source("gnu-standards", "standards, policy", ("gnu-standards",), "/usr/share/doc/gnu-standards",
           read_texinfo_text, probe="standards.text.gz",
           description="GNU Coding Standards, Information for Maintainers of GNU Software"),
    Source("licenses", "legal", ("base-files",), "/usr/share/common-licenses", read_licenses, probe="GPL-3",
           description="free-software licence texts"),
    Source("jargon", "hacker culture, lexicon", ("jargon-text",), "/usr/share/doc/jargon-text", read_jargon,
           probe="jargon.txt.gz", description="The Jargon File 4.4.7"),
    Source("fortunes", "humour, quotations, verse", ("fortunes", "fortunes-min"), "/usr/share/games/fortunes",
           read_fortunes, probe="fortunes", description="fortune cookies, grouped per file"),
    Source("devils-dictionary", "satire (1911)", ("dict-devil",), "/usr/share/dictd",
           lambda root: read_dictd(root, "devil"), probe="devil.index",
           description="Ambrose Bierce, The Devil's Dictionary"),
    Source("gcide", "dictionary, literary quotations", ("dict-gcide",), "/usr/share/dictd",
           lambda root: read_dictd(root, "gcide"), probe="gcide.index",
           description="GNU Collaborative International Dictionary of English (Webster 1913 + WordNet)"),
    Source("bible", "religious, early-modern prose", ("bible-kjv", "bible-kjv-text"), "/usr/lib", read_bible,
           probe="bible.data", commands=("bible",), description="King James Bible, one chapter a document"),
    Source("austen", "novels, dialogue", ("r-cran-janeaustenr",), "/usr/lib/R/site-library/janeaustenr",
           read_austen, probe="data/Rdata.rdb", commands=("Rscript",),
           description="Jane Austen's six novels, one chapter a document"),
]}


def source_root(source: Source, roots: dict[str, str]) -> Path:
    """Where `source` is read from: the user's --root, else its Debian location (newest version for a glob)."""
    if source.name in roots:
        return Path(roots[source.name]).expanduser()
    if any(c in source.root for c in "*?["):
        import glob

        matches = sorted(glob.glob(source.root), key=_version_key)
        return Path(matches[-1]) if matches else Path(source.root)
    return Path(source.root)


def missing_reason(source: Source, roots: dict[str, str]) -> str | None:
    """Why `source` cannot be read here (None when it can)."""
    root = source_root(source, roots)
    need = root / source.probe if source.probe and source.name not in roots else root  # probe: Debian's layout
    if not need.exists():
        return f"{need} not found"
    for cmd in source.commands:
        if shutil.which(cmd) is None:
            return f"the program {cmd!r} is not installed"
    return None


def install_hint(names: Iterable[str]) -> str:
    packages = dict.fromkeys(p for n in names for p in SOURCES[n].packages)
    return "apt-get install " + " ".join(packages)


def list_sources(roots: dict[str, str] | None = None) -> list[dict]:
    """Every known source: name, present here or why not, domain, packages, root."""
    roots = roots or {}
    out = []
    for s in SOURCES.values():
        reason = missing_reason(s, roots)
        out.append({"name": s.name, "present": reason is None, "missing": reason, "domain": s.domain,
                    "packages": list(s.packages), "root": str(source_root(s, roots)), "description": s.description})
    return out


def format_source_list(rows: list[dict]) -> str:
    lines = [f"{'source':<18} {'here':<5} {'domain':<32} packages"]
    for r in rows:
        why = "" if r["present"] else f"  ({r['missing']})"
        lines.append(f"{r['name']:<18} {'yes' if r['present'] else 'no':<5} {r['domain']:<32} "
                     f"{' '.join(r['packages'])}{why}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------- build


def split_hash(seed: int, source: str, doc_id: str) -> float:
    """A document's place in [0, 1): decides its split and its order in the output files; machine-independent."""
    digest = hashlib.sha256(f"{seed}\0{source}\0{doc_id}".encode()).digest()
    return int.from_bytes(digest, "big") / 2**256


def select_sources(config: CorpusConfig) -> tuple[list[str], list[str]]:
    """(sources to read, absent sources skipped); one-line errors for unknown or absent requested sources."""
    for name in config.roots:
        if name not in SOURCES:
            raise HybridizeError(f"--root names an unknown source {name!r}; known: {', '.join(SOURCES)}")
    requested = list(dict.fromkeys(config.sources or []))
    if config.holdout is not None and requested and config.holdout not in requested:
        requested.append(config.holdout)
    unknown = [n for n in requested + ([config.holdout] if config.holdout else []) if n not in SOURCES]
    if unknown:
        raise HybridizeError(f"unknown source {unknown[0]!r}; known: {', '.join(SOURCES)} "
                             "(hybridize corpus --list shows which are installed)")
    if requested:
        missing = {n: missing_reason(SOURCES[n], config.roots) for n in requested}
        missing = {n: why for n, why in missing.items() if why}
        if missing:
            what = "; ".join(f"{n} ({why})" for n, why in missing.items())
            raise HybridizeError(f"source not installed on this machine: {what}; install with: "
                                 f"{install_hint(missing)}")
        return requested, []
    present = [n for n, s in SOURCES.items() if missing_reason(s, config.roots) is None]
    skipped = [n for n in SOURCES if n not in present]
    if config.holdout is not None and config.holdout not in present:
        why = missing_reason(SOURCES[config.holdout], config.roots)
        raise HybridizeError(f"the holdout source {config.holdout} is not installed on this machine ({why}); "
                             f"install with: {install_hint([config.holdout])}")
    if not present:
        raise HybridizeError(f"none of the known sources is installed on this machine; install with: "
                             f"{install_hint(SOURCES)}")
    return present, skipped


def _check(config: CorpusConfig) -> None:
    if not 0.0 <= config.val_fraction < 1.0:
        raise HybridizeError(f"--val-fraction must be in [0, 1), got {config.val_fraction}")
    if config.max_mb_per_source is not None and config.max_mb_per_source <= 0:
        raise HybridizeError(f"--max-mb-per-source must be > 0, got {config.max_mb_per_source}")


def read_source(name: str, root: Path, seed: int = 0, max_chars: int | None = None) -> tuple[list[Doc], list[str]]:
    """A source's documents (cleaned, cut to MAX_CHARS, short ones dropped; under `max_chars`, a hash-chosen
    subset in reading order) and the files they came from."""
    docs: list[Doc] = []
    ids: set[str] = set()
    files: dict[str, None] = {}
    for doc in SOURCES[name].read(root):
        files[doc.file] = None
        text = clean(doc.text)
        pieces = cut(text)
        for i, piece in enumerate(pieces):
            if len(piece) < MIN_CHARS:
                continue
            doc_id = base = doc.id if len(pieces) == 1 else f"{doc.id}#part{i + 1}"
            k = 1
            while doc_id in ids:  # two groups with the same first..last labels: unlikely, but ids must be unique
                k += 1
                doc_id = f"{base}#{k}"
            ids.add(doc_id)
            docs.append(Doc(doc_id, piece, doc.file))
    if max_chars is not None and sum(len(d.text) for d in docs) > max_chars:
        keep, size = set(), 0
        for d in sorted(docs, key=lambda d: split_hash(seed, name, d.id)):
            if size >= max_chars:
                break
            keep.add(d.id)
            size += len(d.text)
        docs = [d for d in docs if d.id in keep]
    return docs, list(files)


def _package_versions(packages: Iterable[str]) -> dict[str, str]:
    """Installed Debian package versions (empty where dpkg is absent: the manifest is then just less complete)."""
    packages = sorted(set(packages))
    if not packages or shutil.which("dpkg-query") is None:
        return {}
    done = subprocess.run(["dpkg-query", "-W", "-f", "${Package}\t${Version}\n", *packages], capture_output=True)
    return dict(line.split("\t", 1) for line in done.stdout.decode().splitlines() if "\t" in line)


def build_corpus(out: str | Path, config: CorpusConfig, progress: bool = True) -> dict:
    """Read the selected sources and write OUT/{train,val,holdout}.jsonl + manifest.json atomically; returns the
    manifest. Nothing is written when a source is unknown or absent, or OUT exists without `force`."""
    from tqdm.auto import tqdm

    from ..output import atomic_output_folder

    _check(config)
    names, skipped = select_sources(config)
    if config.holdout is not None and names == [config.holdout]:
        raise HybridizeError(f"the holdout source {config.holdout} is the only source: nothing would be left to "
                             "train on")
    max_chars = None if config.max_mb_per_source is None else int(config.max_mb_per_source * 1e6)
    splits: dict[str, list[tuple[float, str, Doc]]] = {"train": [], "val": [], "holdout": []}
    stats: dict[str, dict] = {}
    with atomic_output_folder(out, force=config.force) as tmp:
        bar = tqdm(names, desc="corpus", unit=" source", disable=not progress)
        for name in bar:
            bar.set_postfix(source=name)
            root = source_root(SOURCES[name], config.roots)
            docs, files = read_source(name, root, config.seed, max_chars)
            counts = {s: {"documents": 0, "characters": 0} for s in splits}
            for d in docs:
                h = split_hash(config.seed, name, d.id)
                split = "holdout" if name == config.holdout else "val" if h < config.val_fraction else "train"
                splits[split].append((h, name, d))
                counts[split]["documents"] += 1
                counts[split]["characters"] += len(d.text)
            stats[name] = {"domain": SOURCES[name].domain, "packages": list(SOURCES[name].packages),
                           "root": str(root), "commands": list(SOURCES[name].commands),
                           "documents": len(docs), "characters": sum(len(d.text) for d in docs),
                           "splits": {s: c for s, c in counts.items() if c["documents"]}, "files": files}
        bar.close()
        versions = _package_versions(p for n in names for p in SOURCES[n].packages)
        for name in names:
            stats[name]["package_versions"] = {p: versions[p] for p in SOURCES[name].packages if p in versions}
        written = {}
        for split, rows in splits.items():
            rows.sort(key=lambda r: (r[0], r[1], r[2].id))
            digest = hashlib.sha256()
            with open(tmp / f"{split}.jsonl", "w", encoding="utf-8", newline="\n") as f:
                for _, name, d in rows:
                    line = json.dumps({"text": d.text, "source": name, "id": d.id}, ensure_ascii=False) + "\n"
                    f.write(line)
                    digest.update(line.encode())
            written[split] = {"documents": len(rows), "characters": sum(len(r[2].text) for r in rows),
                              "sha256": digest.hexdigest()}
        from .. import __version__

        manifest = {"hybridize": __version__, "config": {k: v for k, v in asdict(config).items() if k != "force"},
                    "split_rule": SPLIT_RULE, "min_chars": MIN_CHARS, "max_chars": MAX_CHARS,
                    "outputs": written, "skipped_absent": {n: missing_reason(SOURCES[n], config.roots)
                                                           for n in skipped},
                    "sources": stats}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    return manifest
