"""Serving under load: continuous batching vs one request at a time, same server code, one run.

    .venv/bin/python bench/serve_load.py                          # embedded default model
    .venv/bin/python bench/serve_load.py --model DIR --concurrency 1 4 16 --requests 32 --max-tokens 64

Starts `glmkit serve` twice on free loopback ports (--no-auth): once with --max-batch 16 (batching)
and once with --max-batch 1 (one at a time). For each concurrency level, a bounded pool of client
tasks sends `--requests` streaming chat completions (as the OpenAI client does: SSE, one chunk per
token) and measures per request:
    TTFT   time to the first content chunk
    TPOT   (end - first token) / (output tokens - 1)
    ITL    the gaps between consecutive content chunks
    E2E    request start to [DONE]
and overall output tokens/s. Prints p50/p90/p99 per metric and level, and the batching /
one-at-a-time ratios. Both servers get the same prompts at temperature 0, so they generate the
same tokens (a reply may end early at a stop token; throughput counts the tokens really sent).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str | None, max_batch: int) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "glmkit", "serve", "--host", "127.0.0.1", "--port", str(port), "--no-auth",
           "--max-batch", str(max_batch), "--max-waiting", "1024"]
    if model:
        cmd += ["--model", model]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not become healthy in 120 s")


async def one_request(client, url: str, model: str, max_tokens: int, i: int) -> dict:
    body = {"model": model, "stream": True, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": f"请写一篇很长的文章，第{i}篇。Write a long essay."}]}
    t0 = time.perf_counter()
    times = []
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("delta", {}).get("content"):
                times.append(time.perf_counter())
    end = time.perf_counter()
    n = len(times)
    return {"ttft": times[0] - t0 if times else float("nan"), "e2e": end - t0, "tokens": n,
            "tpot": (times[-1] - times[0]) / (n - 1) if n > 1 else float("nan"),
            "itl": [b - a for a, b in zip(times, times[1:])]}


async def level(url: str, model: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    import httpx

    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600) as client:
        async def bounded(i):
            async with sem:
                return await one_request(client, url, model, max_tokens, i)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(bounded(i) for i in range(requests)))
        wall = time.perf_counter() - t0
    return {"results": results, "wall": wall, "tok_s": sum(r["tokens"] for r in results) / wall}


def pct(xs, q):
    xs = sorted(x for x in xs if x == x)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))] if xs else float("nan")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None, help="checkpoint directory (default: the embedded model)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    p.add_argument("--max-tokens", type=int, default=64)
    a = p.parse_args()
    table = {}
    for mode, max_batch in (("batching", 16), ("one-at-a-time", 1)):
        proc, url = start_server(a.model, max_batch)
        try:
            import httpx

            name = httpx.get(url + "/v1/models").json()["data"][0]["id"]
            for c in a.concurrency:
                res = asyncio.run(level(url, name, c, max(a.requests, c), a.max_tokens))
                rs = res["results"]
                table[(mode, c)] = {
                    "tok_s": res["tok_s"],
                    **{f"{m}_p{q}": pct([r[m] for r in rs], q) for m in ("ttft", "tpot", "e2e") for q in (50, 90, 99)},
                    **{f"itl_p{q}": pct([x for r in rs for x in r["itl"]], q) for q in (50, 90, 99)},
                }
                t = table[(mode, c)]
                print(f"{mode:14s} c={c:<3d} {t['tok_s']:7.1f} tok/s  TTFT p50 {t['ttft_p50'] * 1e3:7.1f} ms  "
                      f"TPOT p50 {t['tpot_p50'] * 1e3:6.1f} ms  ITL p99 {t['itl_p99'] * 1e3:6.1f} ms  "
                      f"E2E p50 {t['e2e_p50']:6.2f} s", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print("\n| concurrency | batching tok/s | one-at-a-time tok/s | ratio | TPOT p50 batching | TPOT p50 single-request | TPOT ratio |")
    print("|---|---|---|---|---|---|---|")
    single_tpot = table[("batching", a.concurrency[0])]["tpot_p50"]
    for c in a.concurrency:
        b, o = table[("batching", c)], table[("one-at-a-time", c)]
        print(f"| {c} | {b['tok_s']:.1f} | {o['tok_s']:.1f} | {b['tok_s'] / o['tok_s']:.2f}x | "
              f"{b['tpot_p50'] * 1e3:.1f} ms | {single_tpot * 1e3:.1f} ms | {b['tpot_p50'] / single_tpot:.2f}x |")


if __name__ == "__main__":
    main()
