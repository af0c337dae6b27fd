#!/usr/bin/env bash
# The main job: install what is missing, fetch the model, build, and generate
# greedily from the real model (the first fixture chat, "What is the capital
# of France?", as token ids). Safe to run again: finished steps are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup-deps.sh build
./scripts/fetch-model.sh
cargo build --release
model="${LOIP_MODELS_DIR:-$PWD/models}/SmolLM2-135M-Instruct.Q4_1.gguf"
loip() { cargo run --release --quiet -- "$@"; }
loip inspect --model "$model"
echo
echo "generate (token ids in, token ids out):"
loip generate --model "$model" --max-tokens 48 \
  --prompt-ids 1,4093,198,1780,314,260,3575,282,4649,47,2,198,1,520,9531,198
