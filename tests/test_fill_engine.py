"""/v1/fill through the engine's continuous batching, and typed blanks.

Blank j of a fill is one engine request whose prompt is Part A and the spans filled before it
(`BlankPrompt.blank`); the reference is the library's `generate.fill`, which fills all blanks over one
static cache. They must give the same tokens: greedy, and sampled with a seed (blank j draws with seed + j
on both paths). Fills run beside each other in the engine, not one at a time; each is billed once.
A tiny random model (untied head, a seed whose greedy fills are not empty) and the session's BPE.
"""

import asyncio
import json
import re
import threading

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from glmkit.engine import Engine, Request  # noqa: E402
from glmkit.generate import Blank, fill  # noqa: E402
from glmkit.infill import SPAN_STEP, SpecialIds, assemble, blank_prompt  # noqa: E402
from glmkit.sampling import SamplingParams  # noqa: E402
from glmkit.server.app import create_app  # noqa: E402
from tests.serving import assert_error, leave_after, make_model, rows, serve  # noqa: E402

TEXTS = ["The quick [MASK] fox [sMASK] lazy dog.", "床前[MASK]光，疑是[gMASK]", "[MASK]",
         "def add(a, b):\n[MASK]\n    return [MASK] + [sMASK]\n"]


@pytest.fixture(scope="module")
def filler(tok):
    return make_model(tok, tie=False, seed=2)


@pytest.fixture()
def app(filler, tok):
    return create_app(filler, tok, "tiny")


def spans_of(r: dict) -> list[tuple]:
    return [(s["mask"], s["text"], s["start"], s["tokens"], s["finish_reason"]) for s in r["spans"]]


def ref_spans(res) -> list[tuple]:
    return [(s.mask, s.text, s.start, len(s.token_ids), s.finish_reason) for s in res.spans]


def check_same(r: dict, ref, what: str):
    __tracebackhide__ = True
    assert r["text"] == ref.text and spans_of(r) == ref_spans(ref), (
        f"{what}: server vs library\n  server:  {r['text']!r} {spans_of(r)}\n  library: {ref.text!r} {ref_spans(ref)}")
    assert r["usage"]["completion_tokens"] == sum(len(s.token_ids) for s in ref.spans), (what, r["usage"])


# ---- blank j's prompt is the training layout, cut after blank j's <sop> ---------------------------------------
@settings(max_examples=100, deadline=None)
@given(st.data())
def test_blank_prompt_j_is_assembles_layout_in_order(data):
    """`BlankPrompt.blank(j, spans before it)` is what `infill.assemble` trains on with Part B in text order,
    up to and including blank j's <sop>: ids, positions and block positions, read with sep = len(Part A)."""
    special = SpecialIds(mask=90, smask=91, gmask=92, sop=93, eop=94, eos=95, pad=96)
    k = data.draw(st.integers(1, 4), "blanks")
    pieces = [data.draw(st.lists(st.integers(0, 89), max_size=4), f"piece {i}") for i in range(k + 1)]
    fillers = [data.draw(st.lists(st.integers(0, 89), min_size=1, max_size=4), f"span {j}") for j in range(k)]
    masks = [data.draw(st.sampled_from([special.mask, special.smask, special.gmask])) for _ in range(k)]
    tokens, spans = list(pieces[0]), []
    for filler, piece in zip(fillers, pieces[1:]):
        spans.append((len(tokens), len(tokens) + len(filler)))
        tokens += filler + piece
    ex = assemble(tokens, spans, masks, list(range(k)), special)
    p = blank_prompt(pieces, masks, special.sop)
    assert p.sep == ex.sep
    for j in range(k):
        ids, pos = p.blank(j, fillers[:j])
        T = ex.sep + sum(len(f) + 1 for f in fillers[:j]) + 1
        assert ids == ex.input_ids[:T].tolist(), (j, ids, ex.input_ids[:T].tolist())
        assert pos == ex.position_ids[:, :T].tolist(), (j, pos, ex.position_ids[:, :T].tolist())
    with pytest.raises(ValueError, match="needs the"):
        p.blank(k - 1, fillers[: k - 2] if k > 1 else [[1]])


# ---- the engine's fill is the library's fill --------------------------------------------------------------
def test_engine_fill_equals_library_fill(app, filler, tok):
    """Greedy and seeded sampling, 1-3 blanks of each kind, per-blank limits and stop strings: the same spans,
    texts, offsets, token counts and finish reasons as `generate.fill`; the response shape is unchanged."""
    with TestClient(app) as c:
        filled_something = False
        for text in TEXTS:
            for temperature, seed in ((0.0, None), (1.0, 3), (1.0, 11)):
                body = {"text": text, "max_tokens": 5, "temperature": temperature, "seed": seed}
                r = c.post("/v1/fill", json=body)
                assert r.status_code == 200, r.text
                r = r.json()
                assert set(r) == {"id", "object", "created", "model", "text", "spans", "usage"} and r["object"] == "fill"
                assert all(set(s) == {"mask", "text", "start", "tokens", "finish_reason"} for s in r["spans"])
                ref = fill(filler, tok, text, SamplingParams(max_new_tokens=5, temperature=temperature, seed=seed))
                check_same(r, ref, f"{text!r} T={temperature} seed={seed}")
                filled_something |= any(s.text.strip() for s in ref.spans)
        assert filled_something, "the test model fills nothing: comparing empty spans proves nothing"

        # per-blank max_tokens and stop strings (untyped blanks). A stop string cut inside a span: the later
        # blanks see the span as `fill` holds it (without the token that completed the stop), for every cut
        text = TEXTS[3]
        free = fill(filler, tok, text, SamplingParams(max_new_tokens=6, temperature=0))
        s0 = free.spans[0].text
        assert len(free.spans[0].token_ids) >= 3 and len(set(s0)) >= 3, free.spans[0]
        for stop in dict.fromkeys(s0):
            blanks = [Blank(stop=(stop,)), Blank(max_new_tokens=2), None]
            ref = fill(filler, tok, text, SamplingParams(max_new_tokens=6, temperature=0), blanks=blanks)
            assert ref.spans[0].finish_reason == "stop" and stop not in ref.spans[0].text, ref.spans[0]
            assert ref.spans[1].finish_reason == "length" and len(ref.spans[1].token_ids) == 2, ref.spans[1]
            r = c.post("/v1/fill", json={"text": text, "max_tokens": 6, "temperature": 0,
                                         "blanks": [{"stop": [stop]}, {"max_tokens": 2}]}).json()
            check_same(r, ref, f"per-blank stop {stop!r} and max_tokens")


def test_fills_overlap_in_the_engine(app, filler, tok):
    """Two fills sent at once both come back as the library fills them, and the engine ran them side by
    side: a step sampled rows of both (the engine starts once both are queued, so the test does not race)."""
    engine = app.state.server.engine
    submit, step, sample = engine.submit, engine.step, engine._sample_and_emit
    queued, gate, steps = threading.Event(), [True], []

    def counting_submit(req):
        out = submit(req)
        if len({tuple(r.prompt_ids[: r.sep]) for r in list(engine.waiting)}) >= 2:
            queued.set()
        return out

    def gated_step():
        if gate[0]:
            gate[0] = False
            queued.wait(10)  # the two first blanks; a server that runs fills one at a time never gets here
        step()

    def recording_sample():
        steps.append({tuple(r.req.prompt_ids[: r.req.sep]) for r in engine.rows})
        sample()

    engine.submit, engine.step, engine._sample_and_emit = counting_submit, gated_step, recording_sample
    texts = [TEXTS[0], TEXTS[3]]
    out = [None, None]
    with serve(app) as url:
        def post(i):
            out[i] = httpx.post(url + "/v1/fill", json={"text": texts[i], "max_tokens": 6, "temperature": 0}, timeout=60)

        threads = [threading.Thread(target=post, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for text, r in zip(texts, out):
        assert r.status_code == 200, r.text
        check_same(r.json(), fill(filler, tok, text, SamplingParams(max_new_tokens=6, temperature=0)), text)
    shared = sum(len(s) == 2 for s in steps)
    assert shared > 0, f"the fills never shared an engine step: Part As per step {[len(s) for s in steps]}"


# ---- billing -------------------------------------------------------------------------------------------
def test_a_fill_is_billed_once_and_its_usage_is_its_ledger_row(app, filler, tok):
    """prompt_tokens: blank 0's prompt (Part A and <sop>), once; completion_tokens: the spans; cached tokens:
    those of blank 0's prompt only (the later blanks' reuse of Part A is the fill's own, not a discount); the
    response's usage is the ledger row's. The later blanks prefill only the previous span and <sop>: the
    prompt cache serves Part A."""
    text = TEXTS[3]
    body = {"text": text, "max_tokens": 4, "temperature": 0}
    ref = fill(filler, tok, text, SamplingParams(max_new_tokens=4, temperature=0))
    parts = re.split(r"(\[MASK\]|\[sMASK\]|\[gMASK\])", text)
    A = sum(len(tok.encode(t)) for t in parts[0::2] if t) + len(parts[1::2])
    engine = app.state.server.engine
    with TestClient(app) as c:
        first = c.post("/v1/fill", json=body).json()
        prefilled = engine.stats["prefill_tokens"]
        second = c.post("/v1/fill", json=body).json()
    check_same(first, ref, "first")
    check_same(second, ref, "second")
    spans = [len(s.token_ids) for s in ref.spans]
    assert first["usage"] == {"prompt_tokens": A + 1, "completion_tokens": sum(spans), "total_tokens": A + 1 + sum(spans),
                              "prompt_tokens_details": {"cached_tokens": 0}}, first["usage"]
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == A + 1, second["usage"]
    # what the engine prefilled for the first fill: Part A and <sop> once, then each earlier span and the next <sop>
    assert prefilled == A + 1 + sum(n + 1 for n in spans[:-1]), (prefilled, A, spans)
    ledger = rows(app)
    for row, r in zip(ledger, (first, second)):
        u = r["usage"]
        assert (row.endpoint, row.status, row.finish_reason) == ("/v1/fill", 200, ",".join(sorted({s.finish_reason for s in ref.spans})))
        assert (row.prompt_tokens, row.cached_tokens, row.completion_tokens) == (
            u["prompt_tokens"], u["prompt_tokens_details"]["cached_tokens"], u["completion_tokens"]), (row, u)
        assert row.compute_s > 0, row


# ---- the prompt cache reuses a Part A held whole ---------------------------------------------------------
def test_glm_prompt_reuses_a_cached_prefix_only_with_its_part_a_whole(filler, tok):
    """A blank's prompt extends the previous blank's: the engine serves it from the prompt cache and prefills
    only the rest, with the tokens of an uncached run. A prompt that starts with the same ids but reads more
    of them bidirectionally (a longer Part A) must not reuse them: their keys differ."""
    mask, sop = tok.special("mask"), tok.special("sop")
    greedy = SamplingParams(max_new_tokens=4, temperature=0)
    p = blank_prompt([[40, 41], [42, 43], [44]], [mask, mask], sop)

    def req(ids, pos, sep, gen_start, scope):
        return Request(list(ids), greedy, position_ids=[list(x) for x in pos], sep=sep, gen_start=gen_start,
                       gen_step=SPAN_STEP, cache_scope=scope)

    first_ids, first_pos = p.blank(0, [])
    second_ids, second_pos = p.blank(1, [[50, 51, 52]])
    n = len(first_ids)
    longer_a = (second_ids, second_pos, n + 2, p.span_position(1, 1))  # same ids, Part A over them
    cases = [(first_ids, first_pos, p.sep, p.span_position(0, 1)), (second_ids, second_pos, p.sep, p.span_position(1, 1)),
             longer_a]

    def run(scope):
        e = Engine(filler, max_batch=2, max_len=64)
        out = []
        for ids, pos, sep, start in cases:
            r = e.submit(req(ids, pos, sep, start, scope))
            while e.has_work():
                e.step()
            out.append(r)
        return out

    cached, fresh = run("k"), run(None)
    assert [r.cached_tokens for r in cached] == [0, n, 0], [r.cached_tokens for r in cached]
    assert [r.output_ids for r in cached] == [r.output_ids for r in fresh], (
        [r.output_ids for r in cached], [r.output_ids for r in fresh])


# ---- a client that leaves ---------------------------------------------------------------------------------
def test_a_client_that_leaves_cancels_the_blank_in_flight_and_no_more_start(app):
    """The client leaves while blank 0 is queued: that engine request is cancelled, blank 1 and 2 never
    reach the engine, the row says 499 cancelled, and the engine holds nothing of it."""
    server = app.state.server
    submit, submitted = server.engine.submit, []
    body = {"text": TEXTS[3], "max_tokens": 8}

    async def run():
        queued, leave = asyncio.Event(), asyncio.Event()
        server.engine.submit = lambda req: (submit(req), submitted.append(req), queued.set())[0]
        task = asyncio.create_task(leave_after(app, "/v1/fill", body, {}, 10**9, asyncio.Event(), leave))
        await queued.wait()  # blank 0 waits in the engine, which is not running yet
        leave.set()
        server.runner.start()
        try:
            await task
        finally:
            server.runner.stop()

    asyncio.run(run())
    assert len(submitted) == 1 and submitted[0].finish_reason == "cancelled", [(r.finish_reason, r.prompt_ids) for r in submitted]
    (row,) = rows(app)
    assert (row.status, row.finish_reason, row.completion_tokens) == (499, "cancelled", 0), row
    assert server.runner.inflight == {} and not server.engine.has_work()


# ---- errors: 400 before any work ------------------------------------------------------------------------------
@pytest.mark.parametrize("blanks, param, says", [
    ([{"choices": ["a"], "regex": "a+"}], "blanks.0", "at most one of choices, regex, json_schema"),
    ([{}, {"regex": "a+", "json_schema": {"type": "string"}}], "blanks.1", "at most one"),
    ([{"regex": "(unclosed"}], "blanks.0.regex", "regex"),
    ([{}, {"json_schema": {"type": "no-such-type"}}], "blanks.1.json_schema", "json schema"),
    ([{"choices": []}], "blanks.0.choices", "at least 1"),
    ([{"max_tokens": 0}], "blanks.0.max_tokens", "greater than or equal to 1"),
    ([{}, {}, {}, {}], "blanks", "4 given for a text with 3 blanks"),
])
def test_bad_blanks_are_400_naming_the_field_before_any_work(app, blanks, param, says):
    with TestClient(app) as c:
        r = c.post("/v1/fill", json={"text": TEXTS[3], "blanks": blanks})
    err = assert_error(r, 400, param=param)
    assert says.lower() in err["message"].lower(), err
    assert app.state.server.engine.stats["prefill_tokens"] == 0
    (row,) = rows(app)
    assert (row.status, row.prompt_tokens, row.completion_tokens, row.compute_s) == (400, 0, 0, 0.0), row


# ---- typed blanks --------------------------------------------------------------------------------------------
FORM = '{"发文机关": "[MASK]", "成文日期": "[MASK]", "备注": "[MASK]"}'
AGENCIES = ["国务院", "国务院办公厅", "教育部"]
# [0-9], not \d: the grammar engine's \d is any Unicode digit (Rust regex), newer tables than Python's `re`
DATE = r"(19|20)[0-9]{2}年(1[0-2]|[1-9])月(3[01]|[12][0-9]|[1-9])日"
JSON_SAFE = r'[^"\\\x00-\x1f]{0,6}'  # a JSON string's characters, no escapes needed
FORM_BLANKS = [{"choices": AGENCIES, "max_tokens": 24}, {"regex": DATE, "max_tokens": 24}, {"regex": JSON_SAFE, "max_tokens": 30}]


def library_blanks(blanks: list[dict]) -> list[Blank]:
    return [Blank.of(b.get("choices"), b.get("regex"), b.get("json_schema"), b.get("max_tokens"), b.get("stop")) for b in blanks]


def test_typed_blanks_hold_at_temperature_one(app, filler, tok):
    """A form whose first blank is one of three agencies, whose second only admits dates and whose third
    JSON-string-safe text: at temperature 1, over many seeds, every span obeys its blank, the template
    around them is unchanged, `json.loads` reads the result, and the spans are the library's."""
    seeds = range(24)
    with TestClient(app) as c:
        got = [c.post("/v1/fill", json={"text": FORM, "blanks": FORM_BLANKS, "temperature": 1.0, "seed": s}).json()
               for s in seeds]
    template = FORM.split("[MASK]")
    bad, agencies = [], set()
    for s, r in zip(seeds, got):
        spans = [x["text"] for x in r["spans"]]
        ok = (spans[0] in AGENCIES and re.fullmatch(DATE, spans[1]) is not None and re.fullmatch(JSON_SAFE, spans[2]) is not None
              and all(x["finish_reason"] == "stop" for x in r["spans"])
              and r["text"] == "".join(t + x for t, x in zip(template, spans + [""]))
              and json.loads(r["text"]) == {"发文机关": spans[0], "成文日期": spans[1], "备注": spans[2]})
        agencies.add(spans[0])
        if not ok:
            bad.append((s, r["text"], [(x["text"], x["finish_reason"]) for x in r["spans"]]))
    assert not bad, f"{len(bad)} of {len(seeds)} typed fills broke their blanks:\n" + "\n".join(map(repr, bad[:5]))
    assert len(agencies) > 1, f"temperature 1 over {len(seeds)} seeds chose one agency only: {agencies}"
    for s in (0, 1):
        ref = fill(filler, tok, FORM, SamplingParams(temperature=1.0, seed=s), blanks=library_blanks(FORM_BLANKS))
        check_same(got[s], ref, f"typed form, seed {s}")


def test_json_schema_blank_and_untyped_neighbours_match_the_library(app, filler, tok):
    """A JSON-schema blank between an untyped blank and a typed one: greedy and seeded, the server's spans are
    the library's, and the schema blank parses and validates."""
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                               "ok": {"type": "boolean"}}, "required": ["n", "ok"], "additionalProperties": False}
    text = "note: [MASK]; data: [MASK]; flag: [MASK]."
    blanks = [{}, {"json_schema": schema, "max_tokens": 40}, {"choices": ["yes", "no"]}]
    with TestClient(app) as c:
        for temperature, seed in ((0.0, None), (1.0, 5), (1.0, 6)):
            r = c.post("/v1/fill", json={"text": text, "blanks": blanks, "max_tokens": 5, "temperature": temperature,
                                         "seed": seed}).json()
            ref = fill(filler, tok, text, SamplingParams(max_new_tokens=5, temperature=temperature, seed=seed),
                       blanks=library_blanks(blanks))
            check_same(r, ref, f"schema blank T={temperature} seed={seed}")
            jsonschema.validate(json.loads(r["spans"][1]["text"]), schema)
            assert r["spans"][2]["text"] in ("yes", "no"), r["spans"]


def test_cli_fill_takes_typed_blanks(tmp_path, filler, tok, capsys):
    from glmkit import cli
    from glmkit.convert import write_checkpoint

    tok.save(tmp_path / "tok")
    write_checkpoint(filler, tmp_path / "m", extra_files=[tmp_path / "tok" / "tokenizer.json"])
    argv = [FORM, "--model", str(tmp_path / "m"), "--device", "cpu", "--temperature", "1", "--seed", "3"]
    assert cli.fill_main(argv + sum((["--blank", json.dumps(b)] for b in FORM_BLANKS), [])) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["发文机关"] in AGENCIES and re.fullmatch(DATE, out["成文日期"]), out
    with pytest.raises(ValueError, match="--blank .*regex"):
        cli.fill_main(argv + ["--blank", '{"regex": "(unclosed"}'])
    with pytest.raises(ValueError, match="--blank .*JSON object"):
        cli.fill_main(argv + ["--blank", '{"choice": ["a"]}'])
