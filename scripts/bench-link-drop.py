#!/usr/bin/env python3
"""Throughput over time when a link drops mid-run, with and without the
leader's re-planning on measured links (issue #9, case b).

Starts three `loip run` processes on 127.0.0.1 with the real SmolLM2-135M
and budgets that make every node stream layers (as tests/cluster_ring.rs),
each behind an emulated link read from a file (the test knob
LOIP_TEST_LINK_FILE: the node answers the leader's probes, and its ring
sends, as if behind that link). Every link starts at 1 Gbit/s; after
--drop-at seconds of load, the link of one ring member that does not lead
drops to each --to in turn (default: 100 Mbit/s, as issue #9 asks, and a
harsher 5 Mbit/s with 20 ms, where re-planning pays). Clients send greedy requests through
the leader (`loip ask`) without pause; every token's arrival is timed.
The same run is made with `loip run --no-adapt` (the leader measures but
never re-plans). Writes docs/link-drop.png (matplotlib) and the samples
beside it (.json; --plot-only redraws), and prints a summary per run.

    cargo build --release && /usr/bin/python3 scripts/bench-link-drop.py \
        [--to 100mbit/0.1ms --to 5mbit/20ms] [--seconds 60] [--drop-at 20] [--clients 4]
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [
    [1, 504, 3458, 282, 4811, 314, 2, 28, 1085],
    [1, 9690, 198, 2683, 359, 253, 5356, 5646],
    [504, 905, 314, 253, 1379, 282, 11746, 7541],
    [1, 504, 905, 314, 2683, 359, 5356],
]


def status(binary, data):
    o = subprocess.run([binary, "status", "--json", "--data-dir", data],
                       capture_output=True, text=True)
    return json.loads(o.stdout) if o.returncode == 0 else None


def cluster(binary, model, work, adapt, budget):
    subprocess.run([binary, "provision", "ca", "--out", f"{work}/ca"], check=True,
                   capture_output=True)
    procs, datas, files = [], [], []
    seed = None
    for n in (1, 2, 3):
        subprocess.run([binary, "provision", "node", "--ca", f"{work}/ca", "--out",
                        f"{work}/n{n}", "--id", f"{n:016x}"], check=True, capture_output=True)
        link = f"{work}/link{n}"
        with open(link, "w") as f:
            f.write("1gbit/0.1ms")
        data = f"{work}/d{n}"
        cmd = [binary, "run", "--listen", "127.0.0.1:0", "--no-mdns", "--expect", "3",
               "--data-dir", data, "--identity", f"{work}/n{n}", "--model", model,
               "--mem-budget", budget,
               "--device", f"{ROOT}/assets/devices/emu-{'abc'[n - 1]}.toml"]
        if seed:
            cmd += ["--peer", seed]
        if not adapt:
            cmd.append("--no-adapt")
        env = dict(os.environ, RUST_LOG="info,loip::links=debug", LOIP_RING_THREADS="1",
                   LOIP_TEST_LINK_FILE=link)
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(f"{work}/log{n}", "w"),
                             text=True, env=env)
        line = p.stdout.readline()
        if seed is None:
            seed = line.split()[-1]
        procs.append(p)
        datas.append(data)
        files.append(link)
    t0 = time.time()
    while True:
        st = [status(binary, d) for d in datas]
        if all(st) and all(s["plan"] and s["plan"]["epoch"] == s["membership"]["committed"]["epoch"]
                           and (not s["windows"] or (s.get("ring") or {}).get("epoch") == s["plan"]["epoch"])
                           for s in st) and len(st[0]["membership"]["committed"]["members"]) == 3:
            return procs, datas, files, st
        if time.time() - t0 > 60:
            sys.exit("the cluster did not form: see " + work)
        time.sleep(0.2)


def client(binary, data, prompt, max_tokens, stop_at, arrivals, lock):
    while time.time() < stop_at:
        p = subprocess.Popen([binary, "ask", "--timeout", "120", "--data-dir", data,
                              "--prompt-ids", ",".join(map(str, prompt)),
                              "--max-tokens", str(max_tokens)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        while True:
            b = p.stdout.read(1)
            if not b:
                break
            if b == b",":
                with lock:
                    arrivals.append(time.time())
        p.wait()
        with lock:
            arrivals.append(time.time())  # the last token has no comma after it


def run(binary, model, args, to, adapt):
    work = tempfile.mkdtemp(prefix="loip-link-drop-")
    procs, datas, files, st = cluster(binary, model, work, adapt, args.budget)
    try:
        leader = st[0]["membership"]["leader"]
        ids = [s["id"] for s in st]
        entry = ids.index(leader)
        victim = next(i for i, s in enumerate(st) if s["id"] != leader and s["windows"])
        arrivals, lock = [], threading.Lock()
        t0 = time.time()
        stop_at = t0 + args.seconds
        threads = [threading.Thread(target=client, args=(
            binary, datas[entry], PROMPTS[i % len(PROMPTS)], args.max_tokens, stop_at,
            arrivals, lock)) for i in range(args.clients)]
        for t in threads:
            t.start()
        epochs, dropped = [], False
        while time.time() < stop_at:
            now = time.time() - t0
            if not dropped and now >= args.drop_at:
                with open(files[victim], "w") as f:
                    f.write(to)
                dropped = True
            s = status(binary, datas[entry])
            if s:
                epochs.append((now, s["membership"]["committed"]["epoch"],
                               len(s["windows"]), [len(x) for x in s["plan"]["ring_windows"]]))
            time.sleep(0.5)
        for t in threads:
            t.join()
        times = sorted(a - t0 for a in arrivals)
        per_s = [0] * (args.seconds + 1)
        for t in times:
            if 0 <= t <= args.seconds:
                per_s[int(t)] += 1
        log = open(f"{work}/log{entry + 1}").read()
        replans = re.findall(r"another plan\s+is (\d+)% better", log)
        would = re.findall(r"predicted gain (-?[\d.]+)%", log)
        return {"to": to, "adapt": adapt, "per_s": per_s, "epochs": epochs, "victim": ids[victim],
                "leader": leader, "replans": replans, "predicted_gain": would[-1:]}
    finally:
        for p in procs:
            p.kill()
            p.wait()
        shutil.rmtree(work, ignore_errors=True)


def plot(runs, args, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cases = []
    for r in runs:
        if r["to"] not in cases:
            cases.append(r["to"])
    fig, axes = plt.subplots(len(cases), 1, figsize=(8, 3.2 * len(cases)), squeeze=False)
    for ax, to in zip(axes[:, 0], cases):
        for r in (r for r in runs if r["to"] == to):
            w = 3
            s = r["per_s"]
            smooth = [sum(s[max(0, i - w + 1):i + 1]) / min(w, i + 1) for i in range(len(s))]
            ax.plot(range(len(s)), smooth,
                    label=("re-planning on measured links" if r["adapt"] else "fixed plan (--no-adapt)"))
            first = r["epochs"][0][1] if r["epochs"] else 0
            for (t, e, _, _) in r["epochs"]:
                if e != first:
                    ax.axvline(t, color="gray", linestyle=":", linewidth=1)
                    first = e
        ax.axvline(args.drop_at, color="red", linestyle="--", linewidth=1,
                   label=f"a link drops to {to}")
        ax.set_ylabel("tokens/s (3 s mean)")
        ax.set_ylim(bottom=0)
        ax.legend(loc="lower left", fontsize=8)
    axes[-1, 0].set_xlabel("seconds (dotted: a new plan)")
    axes[0, 0].set_title(f"3 nodes, SmolLM2-135M, {args.clients} clients: a link drops from 1 Gbit/s mid-run")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default=f"{ROOT}/target/release/loip")
    ap.add_argument("--model", default=os.environ.get(
        "LOIP_MODELS_DIR", f"{ROOT}/models") + "/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--budget", default="60MiB")
    ap.add_argument("--to", action="append")
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--drop-at", type=int, default=20)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--out", default=f"{ROOT}/docs/link-drop.png")
    ap.add_argument("--plot-only", action="store_true")
    args = ap.parse_args()
    args.to = args.to or ["100mbit/0.1ms", "5mbit/20ms"]
    samples = os.path.splitext(args.out)[0] + ".json"
    if args.plot_only:
        runs = json.load(open(samples))["runs"]
    else:
        runs = [run(args.binary, args.model, args, to, adapt)
                for to in args.to for adapt in (True, False)]
        json.dump({"args": vars(args), "runs": runs}, open(samples, "w"), indent=1)
    for r in runs:
        s = r["per_s"]
        before = s[max(0, args.drop_at - 15):args.drop_at]
        after = s[-15:]
        print(f"{r['to']:>14} {'adapt   ' if r['adapt'] else 'no-adapt'}: {sum(before) / max(1, len(before)):.1f} tok/s "
              f"in the 15 s before the drop, {sum(after) / max(1, len(after)):.1f} in the last 15 s; "
              f"plan epochs {sorted(set(e for _, e, _, _ in r['epochs']))}; "
              f"re-plans for a gain of {r['replans'] or 'none'}%; "
              f"last predicted gain {r['predicted_gain'] or 'none'}%")
    plot(runs, args, args.out)
    print(f"wrote {args.out} and {samples}")


if __name__ == "__main__":
    main()
