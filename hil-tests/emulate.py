#!/usr/bin/env python3
"""An emulated cluster of Jetsons on this machine: one network namespace per
device on a bridge (mDNS works across it, as on a LAN), each link limited
with tbf, each node's memory budget scaled from its device file in
assets/devices/, the real `loip` binary, and a model (by default the
synthetic TinyLlama-1.1B-shaped F16 model). The nodes find each other with
no configuration; one of them (--bare) starts with no model and fetches
its layers from its peers. Then a fixed prompt set runs through the
cluster (`loip ask` on a node), each answer is compared token for token
with the single-node engine (`loip generate`), and TTFT and TPOT are
recorded.

    sudo hil-tests/emulate.py [--model M] [--devices a.toml,...] [--link 1gbit]
                              [--bare NAME] [--max-tokens 32] [--json OUT]

Budgets: a device's memory less its OS reserve, times (model bytes / the
bytes of LLaMA-3.3-70B in BF16, 141 GB), so the five Jetsons hold about as
much of this model as they hold of the 70B one in the paper's setting: less
than all of it, so layers are streamed. What is emulated: the memory budgets
and the links. What is not: compute and storage are this machine's (its
cores and its disk are shared by all nodes), so the timings say how the
cluster behaves, not how fast Jetsons are.

Needs root (namespaces, tc) and iproute2. Exits 1 when an answer is not
exact or the cluster does not form; everything it made is removed at exit.
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timed_ask import timed_ask  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
JETSONS = ["agx-orin-64gb", "agx-orin-32gb", "orin-nx-16gb", "orin-nano-8gb", "xavier-nx-8gb"]
LLAMA_70B_BYTES = 141e9
GIB = 1 << 30


def sh(*args, check=True, **kw):
    return subprocess.run(list(args), check=check, text=True, capture_output=True, **kw)


class Net:
    """A bridge with one namespace per node, joined by veth pairs."""

    def __init__(self, n, link):
        self.tag = os.getpid() % 10000
        self.bridge = f"hilb{self.tag}"
        self.namespaces = []
        self.subnet = f"10.{77 + self.tag % 100}.{self.tag // 100 % 250}"
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        Path(f"/sys/class/net/{self.bridge}/bridge/multicast_snooping").write_text("0")
        sh("ip", "link", "set", self.bridge, "up")
        sh("ip", "addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        for i in range(1, n + 1):
            ns, outer, inner = f"hiln{self.tag}-{i}", f"hilo{self.tag}-{i}", f"hili{self.tag}-{i}"
            sh("ip", "netns", "add", ns)
            self.namespaces.append(ns)
            sh("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
            sh("ip", "link", "set", inner, "netns", ns)
            sh("ip", "link", "set", outer, "master", self.bridge)
            sh("ip", "link", "set", outer, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", ns, "addr", "add", f"{self.ip(i)}/24", "dev", inner)
            sh("ip", "-n", ns, "link", "set", inner, "up")
            sh("ip", "-n", ns, "route", "add", "224.0.0.0/4", "dev", inner, check=False)
            # The device's Ethernet: tbf on what it sends; the bridge side
            # limits what it receives.
            for dev, where in ((inner, ["-n", ns]), (outer, [])):
                sh("tc", *where, "qdisc", "add", "dev", dev, "root", "tbf",
                   "rate", link, "burst", "256kb", "latency", "100ms")

    def ip(self, i):
        return f"{self.subnet}.{1 + i}"

    def iface(self, i):
        return f"hili{self.tag}-{i}"

    def close(self):
        for ns in self.namespaces:
            sh("ip", "netns", "del", ns, check=False)
        sh("ip", "link", "del", self.bridge, check=False)


def device(name):
    path = ROOT / "assets" / "devices" / f"{name}.toml"
    with open(path, "rb") as f:
        return path, tomllib.load(f)


def budget_bytes(dev, model_bytes):
    usable = (dev["memory"]["total_gib"] - dev["memory"].get("os_reserve_gib", 0.0)) * GIB
    return int(usable * model_bytes / LLAMA_70B_BYTES)


def status(loip, ns, data):
    r = sh("ip", "netns", "exec", ns, loip, "status", "--data-dir", str(data), "--json", check=False)
    if r.returncode != 0:
        return None
    try:
        return json.loads(r.stdout)
    except json.JSONDecodeError:
        return None


def ask(loip, ns, data, prompt, max_tokens):
    """Tokens, TTFT and TPOT of one request through the node in `ns`."""
    return timed_ask(["ip", "netns", "exec", ns, loip, "ask", "--data-dir", str(data),
                      "--prompt-ids", ",".join(map(str, prompt)), "--max-tokens", str(max_tokens)])


def reference(loip, model, prompt, max_tokens):
    r = sh(loip, "generate", "--model", str(model), "--prompt-ids", ",".join(map(str, prompt)),
           "--max-tokens", str(max_tokens), "--json")
    return json.loads(r.stdout)["tokens"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--loip", default=str(ROOT / "target" / "release" / "loip"))
    ap.add_argument("--model", default=str(ROOT / "models" / "tinyllama-1.1b-f16.gguf"))
    ap.add_argument("--devices", default=",".join(JETSONS))
    ap.add_argument("--link", default="1gbit", help="tbf rate of every device's Ethernet")
    ap.add_argument("--bare", default="xavier-nx-8gb",
                    help="the device flashed without a model (fetches its layers); '' for none")
    ap.add_argument("--prompts", default=str(ROOT / "hil-tests" / "prompts.json"))
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--form-timeout", type=float, default=300.0)
    ap.add_argument("--json", help="write the report here too")
    ap.add_argument("--keep", action="store_true",
                    help="keep the nodes' data and logs (their directory is printed)")
    a = ap.parse_args()

    if os.geteuid() != 0:
        sys.exit("error: the emulated cluster needs root (network namespaces, tc)")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            sys.exit(f"error: `{tool}` is missing: apt-get install iproute2")
    loip, model = a.loip, Path(a.model)
    if not Path(loip).exists():
        sys.exit(f"error: {loip} is missing: cargo build --release")
    if not model.exists():
        if model.name == "tinyllama-1.1b-f16.gguf":
            print(f"writing {model} (2.2 GB) with loip synth", flush=True)
            sh(loip, "synth", "--out", str(model), "--preset", "tinyllama-1.1b-f16")
        else:
            sys.exit(f"error: {model} is missing")
    names = [n for n in a.devices.split(",") if n]
    devices = [device(n) for n in names]
    prompts = json.loads(Path(a.prompts).read_text())
    model_bytes = model.stat().st_size

    work = Path(tempfile.mkdtemp(prefix="loip-hil-"))
    net, procs = None, []

    def cleanup(*_):
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        if net:
            net.close()
        if a.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    signal.signal(signal.SIGTERM, lambda *_: (cleanup(), sys.exit(1)))
    try:
        net = Net(len(devices), a.link)
        sh(loip, "provision", "ca", "--out", str(work / "ca"))
        nodes = []
        for i, (name, (path, dev)) in enumerate(zip(names, devices), start=1):
            ident, data = work / f"id-{name}", work / f"data-{name}"
            sh(loip, "provision", "node", "--ca", str(work / "ca"), "--out", str(ident))
            budget = budget_bytes(dev, model_bytes)
            cmd = ["ip", "netns", "exec", net.namespaces[i - 1], loip, "run",
                   "--data-dir", str(data), "--identity", str(ident),
                   "--listen", f"{net.ip(i)}:7470", "--interface", net.iface(i),
                   "--mem-budget", str(budget), "--device", str(path),
                   "--expect", str(len(devices))]
            if name != a.bare:
                cmd += ["--model", str(model)]
            log = open(work / f"{name}.log", "w")
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log,
                                          env={**os.environ, "RUST_LOG": "info"}))
            nodes.append({"name": name, "ns": net.namespaces[i - 1], "data": data,
                          "budget": budget, "model": name != a.bare})
            print(f"{name:>14}: {net.ip(i)}, budget {budget / 1e6:.0f} MB"
                  f"{'' if name != a.bare else ', no model (fetches its layers)'}", flush=True)
        print(f"cluster budget {sum(n['budget'] for n in nodes) / 1e6:.0f} MB for a model of "
              f"{model_bytes / 1e6:.0f} MB: layers must be streamed", flush=True)

        # Formation: every node on one committed plan with windows.
        t0, plan = time.monotonic(), None
        while time.monotonic() - t0 < a.form_timeout:
            st = [status(loip, n["ns"], n["data"]) for n in nodes]
            if all(st):
                epochs = {s["membership"]["committed"]["epoch"] for s in st}
                ready = all(s.get("plan") and s["plan"]["epoch"] == s["membership"]["committed"]["epoch"]
                            for s in st)
                if len(epochs) == 1 and 0 not in epochs and ready:
                    plan = st
                    break
            for p, n in zip(procs, nodes):
                if p.poll() is not None:
                    raise RuntimeError(f"{n['name']} exited: {(work / (n['name'] + '.log')).read_text()[-2000:]}")
            time.sleep(1)
        if plan is None:
            raise RuntimeError(f"no plan within {a.form_timeout:.0f} s")
        formed = time.monotonic() - t0
        print(f"formed and planned in {formed:.1f} s, epoch {plan[0]['membership']['committed']['epoch']}:")
        for n, s in zip(nodes, plan):
            print(f"{n['name']:>14}: windows {', '.join(s['windows']) or '-'}"
                  f"{'; shard ' + s['plan']['shard'] if s['plan'].get('shard') else ''}")

        # The prompt set, through the node of the first device.
        rows, exact = [], True
        for k, prompt in enumerate(prompts):
            want = reference(loip, model, prompt, a.max_tokens)
            got, ttft, tpot = ask(loip, nodes[0]["ns"], nodes[0]["data"], prompt, a.max_tokens)
            same = got == want
            exact &= same
            rows.append({"prompt": k, "tokens": len(got), "exact": same, "ttft_s": ttft, "tpot_s": tpot})
            print(f"prompt {k}: {len(got)} tokens, {'exact' if same else 'DIFFERENT'}, "
                  f"TTFT {ttft:.3f} s, TPOT {tpot if tpot is None else round(tpot, 4)} s", flush=True)
        report = {"devices": names, "link": a.link, "model": str(model), "formed_s": formed,
                  "budgets": {n["name"]: n["budget"] for n in nodes},
                  "windows": {n["name"]: s["windows"] for n, s in zip(nodes, plan)},
                  "rows": rows, "exact": exact}
        if a.json:
            Path(a.json).write_text(json.dumps(report, indent=2))
        print("all answers exact" if exact else "error: an answer differs from the single node")
        return 0 if exact else 1
    except (RuntimeError, subprocess.CalledProcessError) as e:
        msg = e.stderr if isinstance(e, subprocess.CalledProcessError) else str(e)
        print(f"error: {msg.strip()}", file=sys.stderr)
        return 1
    finally:
        cleanup()


if __name__ == "__main__":
    sys.exit(main())
