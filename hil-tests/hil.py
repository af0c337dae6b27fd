#!/usr/bin/env python3
"""Hardware-in-the-loop tests on real devices over SSH, driven by an
inventory file (see inventory.example.toml).

    hil-tests/hil.py deploy --inventory inv.toml [--ca ca/] [--binary target/.../loip]
    hil-tests/hil.py check  --inventory inv.toml [--max-tokens 32] [--json OUT]
    hil-tests/hil.py stop   --inventory inv.toml

deploy: for each device, `loip flash` writes its root tree into a local
staging directory (binary, /etc/loip/loip.toml, a node certificate from the
cluster CA, the model unless the device is `model = "none"`, the systemd
unit enabled), which is copied onto the device with tar over SSH; then
`systemctl daemon-reload` and `systemctl restart loip`. Flashing again keeps
each node's identity (loip flash keeps an identity of the same CA).

check: waits until every device reports one committed plan (`loip status
--json` over SSH), runs the fixed prompt set (prompts.json) through the
first device with `loip ask`, compares every answer token for token with
the single-node engine run here (`loip generate` on --model, the same
file the devices were flashed with), and records TTFT and TPOT as seen
from the device. Exits 1 when an answer differs or the cluster does not
form.

stop: `systemctl stop loip` on every device.

Each device needs SSH access as a user that may write / and run systemctl
(root, or sudo without a password: set `sudo = true`). The binary must be
built for the devices' architecture, e.g. for Jetsons:
`cargo build --release --target aarch64-unknown-linux-gnu`.
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIMED_ASK = Path(__file__).resolve().parent / "timed_ask.py"


def load_inventory(path):
    try:
        with open(path, "rb") as f:
            inv = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        sys.exit(f"error: inventory {path}: {e}")
    devices = inv.get("device", [])
    if not devices:
        sys.exit(f"error: {path}: no [[device]] entries")
    for i, d in enumerate(devices):
        for key in ("name", "host"):
            if key not in d:
                sys.exit(f"error: {path}: device {i + 1} has no `{key}`")
        d.setdefault("user", "root")
        d.setdefault("port", 22)
        d.setdefault("sudo", False)
        d.setdefault("model", "whole")
        if d["model"] not in ("whole", "none"):
            sys.exit(f"error: {path}: device {d['name']}: model must be \"whole\" or \"none\"")
    return inv, devices


def ssh_cmd(d, remote, sudo=True):
    if sudo and d["sudo"]:
        remote = "sudo -n " + remote
    return ["ssh", "-p", str(d["port"]), "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
            f"{d['user']}@{d['host']}", remote]


def ssh(d, remote, check=True, **kw):
    r = subprocess.run(ssh_cmd(d, remote), text=True, capture_output=True, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{d['name']}: `{remote}` failed: {r.stderr.strip()}")
    return r


def deploy(inv, devices, a):
    loip = a.binary
    model = inv.get("model")
    if not model or not Path(model).exists():
        sys.exit("error: the inventory's `model` must name the GGUF file to flash")
    peers = [f"{d['host']}:{inv.get('quic_port', 7470)}" for d in devices]
    for d in devices:
        with tempfile.TemporaryDirectory(prefix=f"loip-flash-{d['name']}-") as stage:
            stage = Path(stage)
            (stage / "etc").mkdir()
            (stage / "usr").mkdir()
            # Keep the node's identity across deploys: fetch what it has.
            have = subprocess.run(
                ssh_cmd(d, "test -f /var/lib/loip/identity/node.crt && "
                           "tar -C / -c var/lib/loip/identity"),
                capture_output=True, stdin=subprocess.DEVNULL)
            if have.returncode == 0:
                subprocess.run(["tar", "-C", str(stage), "-x"], input=have.stdout, check=True)
            cmd = [loip, "flash", "--target", str(stage), "--ca", a.ca,
                   "--binary", a.binary_for_device or loip]
            if d["model"] == "whole":
                cmd += ["--model", model]
            if d.get("mem_budget"):
                cmd += ["--mem-budget", d["mem_budget"]]
            if inv.get("static_peers", False):
                for p in peers:
                    if not p.startswith(d["host"] + ":"):
                        cmd += ["--peer", p]
            cmd += ["--expect", str(len(devices))]
            r = subprocess.run(cmd, text=True, capture_output=True)
            if r.returncode != 0:
                raise RuntimeError(f"{d['name']}: loip flash: {r.stderr.strip()}")
            tar = subprocess.Popen(["tar", "-C", str(stage), "-c", "."], stdout=subprocess.PIPE)
            put = subprocess.run(ssh_cmd(d, "tar -C / -x --no-same-owner"), stdin=tar.stdout,
                                 text=True, capture_output=True)
            tar.wait()
            if put.returncode != 0:
                raise RuntimeError(f"{d['name']}: copying the tree: {put.stderr.strip()}")
        ssh(d, "systemctl daemon-reload")
        ssh(d, "systemctl restart loip")
        print(f"{d['name']}: deployed ({'with' if d['model'] == 'whole' else 'without'} the model)",
              flush=True)


def remote_status(d):
    r = ssh(d, "loip status --data-dir /var/lib/loip --json", check=False)
    if r.returncode != 0:
        return None
    try:
        return json.loads(r.stdout)
    except json.JSONDecodeError:
        return None


def check(inv, devices, a):
    model = inv.get("model")
    if not model or not Path(model).exists():
        sys.exit("error: the inventory's `model` must name the GGUF file the devices run")
    t0, plan = time.monotonic(), None
    while time.monotonic() - t0 < a.form_timeout:
        st = [remote_status(d) for d in devices]
        if all(st):
            epochs = {s["membership"]["committed"]["epoch"] for s in st}
            if len(epochs) == 1 and 0 not in epochs and all(s.get("plan") for s in st):
                plan = st
                break
        time.sleep(2)
    if plan is None:
        raise RuntimeError(f"the devices did not agree on a plan within {a.form_timeout:.0f} s")
    print(f"plan epoch {plan[0]['membership']['committed']['epoch']}, "
          f"leader {plan[0]['membership'].get('leader')}")
    for d, s in zip(devices, plan):
        print(f"{d['name']:>16}: windows {', '.join(s['windows']) or '-'}")

    prompts = json.loads(Path(a.prompts).read_text())
    entry = devices[0]
    rows, exact = [], True
    for k, prompt in enumerate(prompts):
        ids = ",".join(map(str, prompt))
        want = json.loads(subprocess.run(
            [a.binary, "generate", "--model", model, "--prompt-ids", ids,
             "--max-tokens", str(a.max_tokens), "--json"],
            text=True, capture_output=True, check=True).stdout)["tokens"]
        # Timed on the device, so the SSH session's own latency is left out.
        remote = f"python3 - /var/lib/loip {ids} {a.max_tokens}"
        r = ssh(entry, remote, input=TIMED_ASK.read_text())
        got = json.loads(r.stdout)
        same = got["tokens"] == want
        exact &= same
        rows.append({"prompt": k, "tokens": len(got["tokens"]), "exact": same,
                     "ttft_s": got["ttft_s"], "tpot_s": got["tpot_s"]})
        print(f"prompt {k}: {len(got['tokens'])} tokens, {'exact' if same else 'DIFFERENT'}, "
              f"TTFT {got['ttft_s']:.3f} s, TPOT {got['tpot_s']} s", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"devices": [d["name"] for d in devices],
                                            "rows": rows, "exact": exact}, indent=2))
    print("all answers exact" if exact else "error: an answer differs from the single node")
    return 0 if exact else 1


def stop(inv, devices, a):
    for d in devices:
        ssh(d, "systemctl stop loip", check=False)
        print(f"{d['name']}: stopped")
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["deploy", "check", "stop"])
    ap.add_argument("--inventory", required=True)
    ap.add_argument("--ca", default="ca", help="the cluster CA directory (loip provision ca)")
    ap.add_argument("--binary", default=str(ROOT / "target" / "release" / "loip"),
                    help="loip for this machine (flash, generate)")
    ap.add_argument("--binary-for-device", dest="binary_for_device",
                    help="loip built for the devices, when their architecture differs")
    ap.add_argument("--prompts", default=str(ROOT / "hil-tests" / "prompts.json"))
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--form-timeout", type=float, default=600.0)
    ap.add_argument("--json", help="write the report here too")
    a = ap.parse_args()
    inv, devices = load_inventory(a.inventory)
    try:
        return {"deploy": deploy, "check": check, "stop": stop}[a.command](inv, devices, a) or 0
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
