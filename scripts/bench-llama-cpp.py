#!/usr/bin/env python3
"""loip against llama.cpp on this machine, in the same sitting.

Shared VMs move by tens of percent within an hour, so absolute tok/s from
different hours do not compare; ratios of runs that alternate do. This
builds llama.cpp's `llama-bench` (the copy vendored in a pinned
llama-cpp-python sdist from PyPI, checked by sha256) under
target/llama.cpp, then runs pairs that alternate the two engines (the one
run second in a pair loses a few percent, so the order flips every pair)
and prints each pair's figures and the median ratio loip / llama.cpp:

- prefill of a 512-token prompt (llama-bench `pp512`);
- decode of 128 tokens after a 512-token prompt (`tg128 @ d512`), the
  shape of the issue's decode target;
- decode of 128 tokens after a 1-token prompt (`tg128`, llama-bench's
  default test).

With `--f32`, llama.cpp also runs an F32 copy of the model (every tensor
dequantized by llama-quantize: the lossless baseline). llama.cpp on the
Q4_1 file quantizes activations to 8 bits and keeps keys and values in
f16; loip does neither. AMX is left out of the build: on VMs that
advertise it without granting its register state, its kernels fault.

Usage: scripts/bench-llama-cpp.py [--model PATH] [--threads T] [--pairs N] [--f32]
"""
import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import urllib.request

VERSION = "0.3.36"
SDIST = (
    "https://files.pythonhosted.org/packages/ec/e9/"
    "e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/"
    f"llama_cpp_python-{VERSION}.tar.gz"
)
SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"

repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ap = argparse.ArgumentParser()
ap.add_argument("--model", default=os.path.join(repo, "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))
ap.add_argument("--loip", default=os.path.join(repo, "target", "release", "loip"))
ap.add_argument("--threads", default="2")
ap.add_argument("--pairs", type=int, default=6)
ap.add_argument("--repeat", default="3", help="runs per engine per pair (each reports its median)")
ap.add_argument("--f32", action="store_true", help="also run llama.cpp on an F32 copy of the model")
ap.add_argument("--dir", default=os.path.join(repo, "target", "llama.cpp"))
args = ap.parse_args()

src = os.path.join(args.dir, f"llama_cpp_python-{VERSION}", "vendor", "llama.cpp")
build = os.path.join(args.dir, "build")
bench_bin = os.path.join(build, "bin", "llama-bench")
quantize_bin = os.path.join(build, "bin", "llama-quantize")


def fail(msg):
    print(f"bench-llama-cpp: {msg}", file=sys.stderr)
    sys.exit(1)


def fetch_source():
    if os.path.isdir(src):
        return
    os.makedirs(args.dir, exist_ok=True)
    tgz = os.path.join(args.dir, f"llama_cpp_python-{VERSION}.tar.gz")
    if not os.path.exists(tgz):
        print(f"downloading llama-cpp-python {VERSION} (llama.cpp inside)", file=sys.stderr)
        urllib.request.urlretrieve(SDIST, tgz + ".part")
        os.replace(tgz + ".part", tgz)
    h = hashlib.sha256()
    with open(tgz, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    if h.hexdigest() != SHA256:
        os.remove(tgz)
        fail(f"{tgz}: sha256 {h.hexdigest()}, expected {SHA256}; removed it, run again")
    with tarfile.open(tgz) as t:
        # The `data` filter (no links out, no devices) where this Python has it.
        extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        t.extractall(args.dir, **extra)


def build_tools():
    targets = ["llama-bench"] + (["llama-quantize"] if args.f32 else [])
    if all(os.path.exists(os.path.join(build, "bin", t)) for t in targets):
        return
    fetch_source()
    cmake = shutil.which("cmake")
    if cmake is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "cmake"], check=True)
        cmake = shutil.which("cmake") or fail("cmake is not on PATH after `pip install cmake`")
    # ggml's native build would take AMX too: name the CPU's features instead.
    flags = []
    if os.uname().machine == "x86_64":
        with open("/proc/cpuinfo") as f:
            have = set(next(l for l in f if l.startswith("flags")).split()[2:])
        feature = {"avx": "AVX", "avx2": "AVX2", "fma": "FMA", "f16c": "F16C", "bmi2": "BMI2",
                   "avx512f": "AVX512", "avx512vbmi": "AVX512_VBMI", "avx512_vnni": "AVX512_VNNI",
                   "avx512_bf16": "AVX512_BF16", "avx_vnni": "AVX_VNNI"}
        flags = ["-DGGML_NATIVE=OFF"] + [f"-DGGML_{o}={'ON' if c in have else 'OFF'}"
                                         for c, o in feature.items()]
    print("building llama.cpp (a few minutes)", file=sys.stderr)
    quiet([cmake, "-S", src, "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
           "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF", *flags])
    quiet([cmake, "--build", build, "--target", *targets, "-j", str(os.cpu_count() or 2)])


def quiet(cmd):
    """Runs a build step, showing its output only if it fails (llama.cpp's
    build prints thousands of compiler warnings)."""
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.stderr.write(r.stdout[-4000:] + r.stderr[-4000:])
        fail(f"{' '.join(cmd[:3])}: exit status {r.returncode}")


def f32_copy():
    out = os.path.join(args.dir, os.path.basename(args.model).rsplit(".", 2)[0] + ".F32.gguf")
    if not os.path.exists(out):
        subprocess.run([quantize_bin, "--allow-requantize", args.model, out + ".part", "F32"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.replace(out + ".part", out)
    return out


# Real-time priority where allowed: keeps other jobs' CPU time out of both
# engines' timings alike.
RT = (["chrt", "-f", "50"] if shutil.which("chrt")
      and subprocess.run(["chrt", "-f", "50", "true"]).returncode == 0 else [])


def rt(cmd):
    return RT + cmd


def loip(prompt):
    out = subprocess.run(
        rt([args.loip, "bench", "--model", args.model, "--threads", args.threads,
            "--prompt-tokens", str(prompt), "--gen-tokens", "128", "--repeat", args.repeat,
            "--json"]),
        check=True, capture_output=True, text=True).stdout
    r = json.loads(out)
    return r["prefill_tok_s"]["median"], r["decode_tok_s"]["median"]


def llama(model):
    """pp512, tg128 @ d512 and tg128, each the median of `repeat` runs."""
    figures = []
    for test in (["-p", "512", "-n", "0"], ["-p", "0", "-n", "128", "-d", "512"],
                 ["-p", "0", "-n", "128"]):
        out = subprocess.run(
            rt([bench_bin, "-m", model, "-t", args.threads, "-r", args.repeat, "-o", "json", *test]),
            check=True, capture_output=True, text=True).stdout
        figures.append(statistics.median(json.loads(out)[0]["samples_ts"]))
    return figures


if not os.path.exists(args.model):
    fail(f"{args.model}: no such model (scripts/fetch-model.sh fetches it)")
if not os.path.exists(args.loip):
    fail(f"{args.loip}: not built (cargo build --release)")
build_tools()
models = [("Q4_1", args.model)] + ([("F32", f32_copy())] if args.f32 else [])

cols = ["prefill 512", "decode after 512", "decode after 1"]
rows = {name: [] for name in ["loip"] + [f"llama.cpp {m}" for m, _ in models]}
print("| pair | engine | " + " | ".join(f"{c} tok/s" for c in cols) + " |")
print("|---|---|" + "---|" * len(cols))
for pair in range(args.pairs):
    def run_loip():
        prefill, decode512 = loip(512)
        _, decode1 = loip(1)
        rows["loip"].append([prefill, decode512, decode1])

    def run_llama():
        for name, path in models:
            rows[f"llama.cpp {name}"].append(llama(path))

    for step in ((run_loip, run_llama) if pair % 2 == 0 else (run_llama, run_loip)):
        step()
    for name, figures in rows.items():
        print(f"| {pair + 1} | {name} | " + " | ".join(f"{v:.1f}" for v in figures[-1]) + " |",
              flush=True)

print()
print("median ratio of the pairs, loip / llama.cpp (and the range of the ratios):")
for name in rows:
    if name == "loip":
        continue
    parts = []
    for i, c in enumerate(cols):
        ratios = [a[i] / b[i] for a, b in zip(rows["loip"], rows[name])]
        parts.append(f"{c} {statistics.median(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f})")
    print(f"  vs {name}: " + ", ".join(parts))
