#!/usr/bin/env bash
# The main job: install what is missing, fetch the model, build, and run
# the demo cluster: three loip node processes on loopback, each streaming
# half of its layers, answering a chat message together (as `loip demo`
# does interactively); then the same question to the single-node engine,
# whose answer it must equal. Safe to run again: finished steps are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup-deps.sh build
./scripts/fetch-model.sh
cargo build --release
model="${LOIP_MODELS_DIR:-$PWD/models}/SmolLM2-135M-Instruct.Q4_1.gguf"
loip() { cargo run --release --quiet -- "$@"; }
loip inspect --model "$model"
echo
question="${LOIP_DEMO_QUESTION:-What is the capital of France?}"
echo "demo cluster of 3 nodes, asked: $question"
ring=$(printf '%s\n' "$question" | loip demo --model "$model" --nodes 3 --max-tokens 48)
echo "$ring"
echo
echo "the single-node engine, asked the same:"
alone=$(loip generate --model "$model" --chat "$question" --max-tokens 48 2>/dev/null)
echo "$alone"
if [ "$ring" != "$alone" ]; then
  echo "error: the cluster's answer differs from the single node's" >&2
  exit 1
fi
echo
echo "identical: the cluster is lossless"
