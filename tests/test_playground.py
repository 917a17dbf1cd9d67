"""The playground page (`/`) in headless Chromium against a live server: fill the blanks, then this key's usage.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_playground.py

Debian's `chromium` and `chromium-driver` (`.ci/run` installs them when it can) driven by Selenium. The
driver is the system one, named in `Service`: Selenium Manager, which would download a driver, never
runs. Without a `chromium` binary the test skips and says so; a browser without its driver fails.

The page is checked against the API it calls: the text it shows for a greedy fill must be the text
POST /v1/fill returns for the same request, and the usage view must count exactly the requests this
key made (read from the ledger, whose row of a request is complete before its response ends).
"""

import json
import shutil
import time

import httpx
import pytest
import torch

from glmkit.config import get_preset
from glmkit.model import GLM
from glmkit.server.app import create_app
from glmkit.server.maas import KeyStore, Ledger, MaaS, UsageRow
from tests.serving import serve

TEXT = "The quick [MASK] fox jumps over the [MASK] dog."
MAX_TOKENS = 5


def untied_model(tok) -> GLM:
    """A tiny random model whose greedy fill is not empty. With tied embeddings (the `debug` preset, and
    test_server's model) the residual stream of a random model is mostly its input embedding, so greedy
    decoding repeats <sop>, which decodes to "": page and API would agree on nothing at all."""
    torch.manual_seed(0)
    m = GLM(get_preset("debug", vocab_size=tok.vocab_size, tie_embeddings=False)).eval()
    m.init_weights(seed=0)
    return m


def chrome():
    """Headless Chromium through the system chromedriver, or a skip when no browser is installed."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium on PATH: install Debian's `chromium chromium-driver` (.ci/run does when run as root)")
    driver = shutil.which("chromedriver")
    assert driver is not None, f"{browser} is installed but chromedriver is not: apt-get install chromium-driver"
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as e:
        pytest.fail(f"selenium is missing ({e}): pip install -e '.[test]'")
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1000,1200"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the page's console, read at the end
    return webdriver.Chrome(service=Service(driver), options=opts)


# Resolves once element `id` satisfies `test` (a JS expression over `el`), checked now and on every DOM
# change under it: the page's own event, no polling.
WAIT_JS = """
const [id, test, done] = arguments, el = document.getElementById(id);
const ok = () => { try { return Function("el", "return " + test)(el); } catch (e) { return false; } };
if (ok()) { done(el.textContent); return; }
const obs = new MutationObserver(() => { if (ok()) { obs.disconnect(); done(el.textContent); } });
obs.observe(el, {childList: true, subtree: true, characterData: true, attributes: true});
"""


def wait_for(driver, what: str, id_: str, test: str) -> str:
    """Element `id_`'s text once the JS expression `test` over `el` holds; fails naming `what` after 20 s."""
    from selenium.common.exceptions import TimeoutException

    driver.set_script_timeout(20)
    try:
        return driver.execute_async_script(WAIT_JS, id_, test)
    except TimeoutException:
        text = driver.find_element("id", id_).get_property("textContent")
        raise AssertionError(f"timed out after 20 s waiting for {what}; #{id_} shows {text!r}") from None


def test_playground_fill_and_usage_in_chromium(tmp_path, tok):
    from selenium.webdriver.common.by import By

    db = tmp_path / "maas.sqlite"
    store = KeyStore(db)
    raw, key = store.create("browser")
    _, other = store.create("someone-else")
    maas = MaaS(store, Ledger(db))
    app = create_app(untied_model(tok), tok, "tiny", maas=maas)
    # another key's usage, which the page must not show
    maas.ledger.record(UsageRow(time.time(), "other", other.id, "/v1/fill", prompt_tokens=1000, completion_tokens=1000))

    driver = chrome()
    try:
        with serve(app) as url:
            driver.get(url + "/")
            assert driver.title == "glmkit playground", driver.title
            el = lambda id_: driver.find_element(By.ID, id_)
            assert raw.startswith(el("key").get_attribute("placeholder").rstrip(".")), "the key field shows another key format"
            el("key").send_keys(raw)
            el("fill-text").clear()
            el("fill-text").send_keys(TEXT)
            el("fill-temp").clear()
            el("fill-temp").send_keys("0")
            el("fill-max").clear()
            el("fill-max").send_keys(str(MAX_TOKENS))
            el("fill-go").click()
            shown = wait_for(driver, "the fill result on the page", "fill-out", "!['', '…'].includes(el.textContent)")
            assert el("fill-out").get_attribute("class") != "err", f"the page shows an error: {shown!r}"

            # the same request, as the page sends it, straight to the API
            body = {"text": TEXT, "temperature": 0, "max_tokens": MAX_TOKENS}
            ref = httpx.post(url + "/v1/fill", json=body, headers={"authorization": f"Bearer {raw}"}, timeout=30)
            assert ref.status_code == 200, ref.text
            ref = ref.json()
            assert len(ref["spans"]) == 2 and any(s["text"] for s in ref["spans"]), f"nothing filled: {ref['spans']}"
            spans = "\n".join(f"{s['mask']} → {json.dumps(s['text'], ensure_ascii=False)}" for s in ref["spans"])
            assert shown == ref["text"] + "\n\n" + spans, (
                f"page and API differ for the same greedy fill\n  page: {shown!r}\n  API:  {ref['text']!r}\n  spans: {spans!r}")

            # both fills are in the ledger (a row is complete before its response's last byte): the page must count both
            assert len(maas.ledger.rows(key.id)) == 2, maas.ledger.rows(key.id)
            el("usage-go").click()
            usage = wait_for(driver, "the usage view", "usage-out", "el.textContent !== ''")
            assert el("usage-out").get_attribute("class") != "err", f"the usage view shows an error: {usage!r}"
            data = json.loads(usage)["data"]
            rows = maas.ledger.rows(key.id)
            assert [(d["key_id"], d["requests"], d["prompt_tokens"], d["completion_tokens"]) for d in data] == [
                (key.id, 2, sum(r.prompt_tokens for r in rows), sum(r.completion_tokens for r in rows))], (data, rows)
            assert rows[0].completion_tokens == ref["usage"]["completion_tokens"] == sum(s["tokens"] for s in ref["spans"])

            # without the key the page shows the server's 401 message, not a stale result
            el("key").clear()
            el("usage-go").click()
            wait_for(driver, "the 401 in the usage view", "usage-out", "el.className === 'err'")
            assert "no API key" in el("usage-out").text, el("usage-out").text

            # script errors (uncaught exceptions); failed HTTP loads ("network": the 401 above, /favicon.ico) are not
            errors = [m for m in driver.get_log("browser") if m["level"] == "SEVERE" and m["source"] != "network"]
            assert not errors, f"the page logged errors: {errors}"
    finally:
        driver.quit()
