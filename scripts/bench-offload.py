#!/usr/bin/env python3
"""Offloading benchmark: the 1.1B F16 synthetic model at budgets of 100%,
50% and 25%, decode at batch 1 and 16, with the no-prefetch (on-demand) and
page-cache (mmap, pages dropped first) baselines measured in the same run.

The mmap baseline runs in a memory cgroup of the same budget (page cache
included) where the machine allows it, so it cannot simply keep the whole
model in the page cache. Prints a markdown table: tok/s, bubble share of step time, storage read
bandwidth, the bound max(compute, streamed bytes / bandwidth) with compute
taken from the all-resident run of the same batch, overlap efficiency
(bound / measured step) and the speed-up over no-prefetch.

Usage: scripts/bench-offload.py [--model PATH] [--threads T] [--gen N]
"""
import argparse
import json
import os
import subprocess
import sys

repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ap = argparse.ArgumentParser()
ap.add_argument("--model", default=os.path.join(repo, "models", "tinyllama-1.1b-f16.gguf"))
ap.add_argument("--loip", default=os.path.join(repo, "target", "release", "loip"))
ap.add_argument("--threads", default="2")
ap.add_argument("--prompt", default="16")
ap.add_argument("--gen", default="16")
ap.add_argument("--repeat", default="1")
ap.add_argument("--batches", default="1,16")
ap.add_argument("--budgets", default="100%,50%,25%")
args = ap.parse_args()

if not os.path.exists(args.model):
    subprocess.run([args.loip, "synth", "--out", args.model, "--preset", "tinyllama-1.1b-f16"], check=True)


CGROUP = "/sys/fs/cgroup/memory"
MODEL_BYTES = os.path.getsize(args.model)
OVERHEAD = 64 << 20


def limited(cmd, limit):
    """Runs `cmd` in a memory cgroup (v1) of `limit` bytes, page cache
    included, so that the mmap baseline lives under the same budget as
    loip's loader. Without a writable cgroup the baseline runs unlimited,
    and the table says so."""
    group = os.path.join(CGROUP, f"loip-bench-{os.getpid()}")
    try:
        os.mkdir(group)
        with open(os.path.join(group, "memory.limit_in_bytes"), "w") as f:
            f.write(str(limit))
    except OSError:
        return cmd, None
    return ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh"] + cmd, group


def bench(batch, budget=None, mode="prefetch"):
    cmd = [args.loip, "bench", "--model", args.model, "--threads", args.threads, "--batch", str(batch),
           "--prompt-tokens", args.prompt, "--gen-tokens", args.gen, "--repeat", args.repeat, "--json"]
    group = None
    if budget:
        cmd += ["--mem-budget", budget, "--load-mode", mode]
        if mode == "mmap":
            limit = int(MODEL_BYTES * float(budget.rstrip("%")) / 100) + OVERHEAD
            cmd, group = limited(cmd, limit)
    elif mode != "prefetch":
        cmd += ["--load-mode", mode]
    try:
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    finally:
        if group:
            try:
                os.rmdir(group)
            except OSError:
                pass
    r = json.loads(out)
    r["cgroup_limited"] = group is not None
    return r


rows = []
for batch in [int(b) for b in args.batches.split(",")]:
    resident = bench(batch)
    compute = resident["step_s"]["median"]
    rows.append((batch, "resident", "-", resident, compute))
    for budget in args.budgets.split(","):
        if budget == "100%":
            continue
        for mode in ["prefetch", "on-demand", "mmap"]:
            try:
                r = bench(batch, budget, mode)
            except subprocess.CalledProcessError as e:
                print(f"batch {batch} budget {budget} {mode}: failed: {e}", file=sys.stderr)
                continue
            rows.append((batch, mode, budget, r, compute))

print("| batch | budget | loading | tok/s | step ms | bubbles | storage GB/s | streamed MiB/step | bound ms | efficiency | vs on-demand |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
by = {(b, bud, m): r for b, m, bud, r, _ in rows}
for batch, mode, budget, r, compute in rows:
    step = r["step_s"]["median"]
    p = r.get("placement") or {}
    streamed = p.get("accounting", {}).get("streamed_per_step", 0)
    bw = (r.get("read_bandwidth") or {}).get("median")
    bubbles = (r.get("bubble_share") or {}).get("median")
    bound = max(compute, streamed / bw) if bw and mode != "mmap" else None
    base = by.get((batch, budget, "on-demand"))
    speedup = r["decode_tok_s"]["median"] / base["decode_tok_s"]["median"] if base and mode == "prefetch" else None
    f = lambda v, fmt: (fmt % v) if v is not None else "-"
    label = mode + (" (cgroup)" if r.get("cgroup_limited") else "")
    print(f"| {batch} | {budget if budget != '-' else '100%'} | {label} | {r['decode_tok_s']['median']:.2f} | {step * 1e3:.0f} "
          f"| {f(bubbles and bubbles * 100, '%.0f%%')} | {f(bw and bw / 1e9, '%.2f')} | {streamed / 2**20:.0f} "
          f"| {f(bound and bound * 1e3, '%.0f')} | {f(bound and bound / step, '%.2f')} | {f(speedup, '%.2fx')} |")
