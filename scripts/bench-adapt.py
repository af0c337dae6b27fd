#!/usr/bin/env python3
"""Throughput over time with and without online adaptation to KV growth.

Starts `loip serve` on SmolLM2-135M twice under the same --mem-budget, with
--max-batch 4 and --context 2048: once adapting the resident set as the KV
caches grow (the default), once with --no-adapt (the fixed reservation of
KV for 4 sequences of 2048 tokens, which streams more weights from the
start). Each run sends 4 concurrent completions of up to 2000 tokens at
temperature 0 (counting prompts, which the model continues without
stopping), samples /metrics every half second (generated tokens, KV bytes,
resident units) and writes docs/adapt-kv.png (matplotlib: `apt-get install
python3-matplotlib` and run it with /usr/bin/python3, or `pip install
matplotlib`) from the samples, which it also saves beside the chart (.json;
`--plot-only` redraws from them), and prints a summary per run.

    cargo build --release && /usr/bin/python3 scripts/bench-adapt.py [--budget 440MiB] [--tokens 2000]
"""

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def metric(port, name):
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", line)
        if m:
            return float(m.group(2))
    return float("nan")


def start(binary, model, args, data_dir):
    cmd = [binary, "serve", "--model", model, "--host", "127.0.0.1", "--port", "0",
           "--no-mdns", "--data-dir", data_dir] + args
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    port = None
    for line in p.stderr:
        m = re.search(r"serving on http://[^:]+:(\d+)", line)
        if m:
            port = int(m.group(1))
            break
    if port is None:
        p.wait()
        sys.exit(f"loip serve did not start: {' '.join(cmd)}")
    log = open(os.path.join(data_dir, "serve.log"), "w")
    threading.Thread(target=lambda: [log.write(line) for line in p.stderr], daemon=True).start()
    t0 = time.time()
    while True:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).status == 200:
                break
        except Exception:
            pass
        if p.poll() is not None:
            sys.exit(f"loip serve exited: {' '.join(cmd)}")
        if time.time() - t0 > 120:
            sys.exit("loip serve never became ready")
        time.sleep(0.2)
    return p, port


def run(label, binary, model, args, data_dir, n, tokens):
    p, port = start(binary, model, args, data_dir)
    results = [None] * n

    def client(i):
        body = json.dumps({"prompt": f"Counting from {i * 100 + 1}: {i * 100 + 1}, {i * 100 + 2}, {i * 100 + 3},",
                           "max_tokens": tokens, "temperature": 0}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body)
        try:
            with urllib.request.urlopen(req, timeout=3600) as r:
                results[i] = json.load(r)
        except urllib.error.HTTPError as e:
            results[i] = {"error": e.read().decode()}
        except OSError as e:
            results[i] = {"error": str(e)}

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    t0 = time.time()
    for t in threads:
        t.start()
    samples = []
    while any(t.is_alive() for t in threads):
        samples.append({
            "t": time.time() - t0,
            "tokens": metric(port, "loip_generated_tokens_total"),
            "kv": metric(port, "loip_kv_bytes"),
            "resident": metric(port, "loip_resident_units"),
        })
        time.sleep(0.5)
    wall = time.time() - t0
    summary = {
        "label": label,
        "wall_s": wall,
        "tokens": [(r or {}).get("usage", {}).get("completion_tokens") for r in results],
        "errors": [(r or {}).get("error", "no answer") for r in results if not r or "error" in r],
        "demotions": metric(port, "loip_demotions_total"),
        "promotions": metric(port, "loip_promotions_total"),
        "bytes_read": metric(port, "loip_storage_read_bytes_total"),
    }
    total = sum(t or 0 for t in summary["tokens"])
    summary["tok_s"] = total / wall
    if p.poll() is not None:
        summary["errors"].append(f"loip serve exited with {p.returncode}")
    p.kill()
    p.wait()
    return samples, summary


def rates(samples, window=4.0):
    """Tokens per second over a trailing window, per sample."""
    out = []
    for i, s in enumerate(samples):
        j = i
        while j > 0 and s["t"] - samples[j - 1]["t"] <= window:
            j -= 1
        dt = s["t"] - samples[j]["t"]
        out.append((s["tokens"] - samples[j]["tokens"]) / dt if dt > 0 else 0.0)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/loip"))
    ap.add_argument("--model", default=os.path.join(
        os.environ.get("LOIP_MODELS_DIR", os.path.join(ROOT, "models")), "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--budget", default="440MiB")
    ap.add_argument("--sequences", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--threads", default="2")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs/adapt-kv.png"))
    ap.add_argument("--plot-only", action="store_true",
                    help="redraw the chart from the samples saved beside it (.json)")
    a = ap.parse_args()
    import tempfile
    data = os.path.splitext(a.out)[0] + ".json"
    if a.plot_only:
        with open(data) as f:
            runs = [tuple(r) for r in json.load(f)]
    else:
        common = ["--mem-budget", a.budget, "--context", "2048", "--max-batch", str(a.sequences),
                  "--threads", a.threads]
        runs = []
        for label, extra in [("adaptive", []), ("fixed reservation (--no-adapt)", ["--no-adapt"])]:
            with tempfile.TemporaryDirectory() as d:
                samples, summary = run(label, a.binary, a.model, common + extra, d, a.sequences, a.tokens)
            print(json.dumps(summary))
            runs.append((samples, summary))
        os.makedirs(os.path.dirname(a.out), exist_ok=True)
        with open(data, "w") as f:
            json.dump(runs, f)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("matplotlib is missing: apt-get install python3-matplotlib (or pip install matplotlib)")
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for samples, summary in runs:
        t = [s["t"] for s in samples]
        ax1.plot(t, rates(samples), label=f"{summary['label']}: {summary['tok_s']:.1f} tok/s overall")
        ax2.plot(t, [s["kv"] / 2**20 for s in samples], label=f"KV MiB, {summary['label']}")
    adaptive = runs[0][0]
    ax3 = ax2.twinx()
    ax3.plot([s["t"] for s in adaptive], [s["resident"] for s in adaptive], "k--",
             label="resident units (adaptive)")
    ax3.set_ylabel("resident units of 61")
    ax1.set_ylabel("tokens/s (4 s window)")
    ax1.set_title(f"SmolLM2-135M, {a.sequences} sequences growing to {a.tokens} tokens, budget {a.budget}")
    ax1.legend(loc="lower left")
    ax2.set_ylabel("KV cache MiB")
    ax2.set_xlabel("seconds")
    ax2.legend(loc="upper left")
    ax3.legend(loc="lower right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    fig.savefig(a.out, dpi=100)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
