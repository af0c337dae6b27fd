#!/usr/bin/env python3
"""`loip ask` with each token timed as it is printed: the tokens, TTFT and
TPOT. Imported by emulate.py; hil.py runs this file on the device itself
(`python3 - DATA_DIR IDS MAX_TOKENS` with the file on stdin), so the SSH
session's own latency is left out.
"""
import json
import subprocess
import sys
import time


def timed_ask(cmd):
    """Runs `cmd` (a `loip ask` command line, without --json) and returns
    (tokens, ttft_s, tpot_s); raises RuntimeError with its message when it
    fails."""
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stamps, text = [], b""
    while True:
        b = p.stdout.read(1)
        if not b:
            break
        text += b
        if b in (b",", b"\n") and text.strip(b",\n"):
            stamps.append(time.monotonic())
    err = p.stderr.read().decode()
    if p.wait() != 0:
        raise RuntimeError(f"loip ask: {err.strip()}")
    tokens = [int(t) for t in text.decode().strip().split(",") if t]
    ttft = stamps[0] - t0 if stamps else None
    tpot = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else None
    return tokens, ttft, tpot


if __name__ == "__main__":
    data, ids, n = sys.argv[1:4]
    try:
        tokens, ttft, tpot = timed_ask(["loip", "ask", "--data-dir", data, "--prompt-ids", ids,
                                        "--max-tokens", n])
    except RuntimeError as e:
        sys.exit(str(e))
    print(json.dumps({"tokens": tokens, "ttft_s": ttft, "tpot_s": tpot}))
