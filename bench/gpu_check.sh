#!/usr/bin/env bash
# One-shot GPU check for a session that gets an H100/H200 with Python 3.12 + CUDA torch but no
# megatron-core, no Transformer Engine and no network. Fits in 8 minutes: install from local
# wheels (~30 s), then the five steps of bench/gpu_check.py, each in its own time box (450 s in
# all): (1) import + device report, (2) tiny model bf16 5 steps finite loss, (3) tiny model bf16
# + distributed optimizer: save at 2, resume, exact, (4) Llama-3.2-1B shape seq 4096: ours vs
# the HF loop (tokens/s, MFU, peak memory), (5) SDPA vs unfused attention: speed, loss parity.
#
#   bash bench/gpu_check.sh --fetch            # on a machine WITH network, before the session:
#                                              # wheels + Llama-3 tokenizer.model into .whl/
#   bash bench/gpu_check.sh OUT_DIR            # on the GPU (carry .whl/ there): OUT_DIR gets
#                                              # gpu_check.log and results.json
#   bash bench/gpu_check.sh OUT_DIR --cpu-smoke   # the same steps in tiny form on a CPU (tests)
#
# .whl/ (git-ignored, never committed; about 50 MB, under the 64 MiB a device run may carry):
# megatron-core 0.16.1's cp312 wheel (2.6 MB, --no-deps: its torch requirement is the
# device's), and, with their dependencies, what our package needs that a bare torch image
# lacks: psutil (megatron-core's checkpoint save hangs without it), pyyaml, tiktoken (the
# Llama-3 tokenizer), transformers (the HF baseline loop) with tokenizers / safetensors /
# huggingface-hub, numpy, packaging. Already-installed packages are kept; only what is
# missing is installed, from .whl/ alone (--no-index). Environment: PYTHON (default python3),
# WHEELS (default .whl), TOKENIZER_MODEL (default $WHEELS/tokenizer.model).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
TOKENIZER_MODEL=${TOKENIZER_MODEL:-$WHEELS/tokenizer.model}
PACKAGES=(psutil pyyaml tiktoken "transformers==5.24.0" packaging)
DOWNLOAD=(--only-binary=:all: --python-version 3.12 --implementation cp
          --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux2014_x86_64 -d "$WHEELS")

if [[ "${1:-}" == "--fetch" ]]; then
  set -e
  mkdir -p "$WHEELS"
  "$PYTHON" -m pip download --no-deps "${DOWNLOAD[@]}" megatron-core==0.16.1
  "$PYTHON" -m pip download "${DOWNLOAD[@]}" "${PACKAGES[@]}"
  PYTHONPATH=. "$PYTHON" -c "import shutil; from megatron_cpt import assets; \
shutil.copy(assets.llama3_tokenizer_model(), '$WHEELS/tokenizer.model')"
  du -sh "$WHEELS"
  exit 0
fi

OUT=${1:?usage: bash bench/gpu_check.sh OUT_DIR [--cpu-smoke] | --fetch}
shift
mkdir -p "$OUT"
START=$SECONDS
if [[ " $* " != *" --cpu-smoke "* ]]; then
  {
    echo "===== install (from $WHEELS, no network) ====="
    if ! "$PYTHON" -c "import megatron.core" 2>/dev/null; then
      timeout 60 "$PYTHON" -m pip install --no-index --no-deps "$WHEELS"/megatron_core-0.16.1-*.whl \
        || timeout 60 "$PYTHON" -m pip install --break-system-packages --no-index --no-deps \
             "$WHEELS"/megatron_core-0.16.1-*.whl
    fi
    timeout 90 "$PYTHON" -m pip install --no-index --find-links "$WHEELS" "${PACKAGES[@]}" \
      || timeout 90 "$PYTHON" -m pip install --break-system-packages --no-index \
           --find-links "$WHEELS" "${PACKAGES[@]}"
    echo "===== install done in $((SECONDS - START)) s ====="
  } >>"$OUT/gpu_check.log" 2>&1
  echo "install: $((SECONDS - START)) s (log: $OUT/gpu_check.log)"
fi
BUDGET=$((450 - (SECONDS - START)))
exec "$PYTHON" bench/gpu_check.py "$OUT" --tokenizer-model "$TOKENIZER_MODEL" \
  --budget-s "$((BUDGET > 60 ? BUDGET : 60))" "$@"
