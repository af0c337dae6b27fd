#!/usr/bin/env python3
"""TTFT and tokens/s of `loip serve` through HTTP, with 1, 8 and 32
concurrent streaming clients (standard library only).

    scripts/bench-http.py [--url http://HOST:PORT] [--model M] [--clients 1,8,32]
                          [--max-tokens 128] [--rounds 2] [--threads T]

Without --url it starts target/release/loip serve on 127.0.0.1 (with
--max-batch set to the largest client count) and stops it at the end.
Each client sends one streaming chat request per round (a distinct prompt,
temperature 0, stream_options.include_usage); TTFT is the time to the first
chunk with text, tokens come from the usage chunk. Aggregate tok/s is all
clients' completion tokens over the round's wall time.
"""
import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse

TOPICS = ["the sea", "a cat", "mountains", "rain", "coffee", "the moon", "trains", "bread",
          "a library", "winter", "bees", "a lighthouse", "jazz", "deserts", "a forest", "clocks"]


def one(url, key, i, max_tokens, out):
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    body = json.dumps({
        "messages": [{"role": "user", "content": f"Write a long story about {TOPICS[i % len(TOPICS)]}."}],
        "max_tokens": max_tokens, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True},
    })
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = "Bearer " + key
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, headers)
    r = conn.getresponse()
    if r.status != 200:
        out.append({"error": f"{r.status} {r.read()[:200]!r}"})
        return
    ttft, tokens = None, 0
    for raw in r:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        j = json.loads(line[6:])
        if j.get("usage"):
            tokens = j["usage"]["completion_tokens"]
        for c in j.get("choices", []):
            if ttft is None and c.get("delta", {}).get("content"):
                ttft = time.perf_counter() - t0
    out.append({"ttft": ttft, "tokens": tokens, "s": time.perf_counter() - t0})


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(p / 100 * len(xs) + 0.5) - 1))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url")
    ap.add_argument("--model", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--key", default=os.environ.get("LOIP_API_KEY"))
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    counts = [int(c) for c in a.clients.split(",")]
    server = None
    url = a.url
    if not url:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        target = os.environ.get("CARGO_TARGET_DIR", os.path.join(root, "target"))
        binary = os.path.join(target, "release", "loip")
        server = subprocess.Popen(
            [binary, "serve", "--model", a.model, "--host", "127.0.0.1", "--port", "0",
             "--threads", str(a.threads), "--max-batch", str(max(counts))],
            stderr=subprocess.PIPE, text=True)
        for line in server.stderr:
            if line.startswith("loip: serving on "):
                url = line.split()[-1]
                break
        threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()
        u = urllib.parse.urlsplit(url)
        while True:
            try:
                c = http.client.HTTPConnection(u.hostname, u.port, timeout=5)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)
    try:
        one(url, a.key, 0, 8, [])  # warm-up
        rows = []
        for n in counts:
            ttfts, aggs = [], []
            for _ in range(a.rounds):
                out, threads = [], []
                t0 = time.perf_counter()
                for i in range(n):
                    t = threading.Thread(target=one, args=(url, a.key, i, a.max_tokens, out))
                    t.start()
                    threads.append(t)
                for t in threads:
                    t.join()
                wall = time.perf_counter() - t0
                errors = [o["error"] for o in out if "error" in o]
                if errors:
                    sys.exit(f"{len(errors)} requests failed: {errors[0]}")
                ttfts += [o["ttft"] for o in out if o["ttft"] is not None]
                aggs.append(sum(o["tokens"] for o in out) / wall)
            rows.append({"clients": n, "ttft_p50_s": statistics.median(ttfts),
                         "ttft_p95_s": pct(ttfts, 95), "aggregate_tok_s": statistics.median(aggs),
                         "per_client_tok_s": statistics.median(aggs) / n})
        if a.json:
            print(json.dumps(rows, indent=1))
        else:
            print(f"{'clients':>7} {'TTFT p50 s':>10} {'TTFT p95 s':>10} {'agg tok/s':>9} {'tok/s/client':>12}")
            for r in rows:
                print(f"{r['clients']:>7} {r['ttft_p50_s']:>10.3f} {r['ttft_p95_s']:>10.3f} "
                      f"{r['aggregate_tok_s']:>9.1f} {r['per_client_tok_s']:>12.1f}")
            base = rows[0]["aggregate_tok_s"]
            for r in rows[1:]:
                print(f"{r['clients']} clients: {r['aggregate_tok_s'] / base:.2f}x the aggregate tok/s of {rows[0]['clients']}")
    finally:
        if server:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    main()
