# Activate the project's virtual environment:  source activate.sh
# (bash setup.sh creates it.)  Sourced, so no `set -e`: it would leak into your shell.

if ! (return 0 2>/dev/null); then
  echo "activate.sh must be sourced, not executed: source activate.sh" >&2
  exit 1
fi

# the script's own folder, so it works from anywhere (eval: sh would reject bash/zsh syntax)
if [ -n "${BASH_VERSION:-}" ]; then eval '_finqa_src="${BASH_SOURCE[0]}"'
elif [ -n "${ZSH_VERSION:-}" ]; then eval '_finqa_src="${(%):-%x}"'
else _finqa_src="./activate.sh"; fi
_finqa_root="$(cd "$(dirname "$_finqa_src")" && pwd)"
unset _finqa_src
if [ ! -f "$_finqa_root/venv/bin/activate" ]; then
  echo "no virtual environment at $_finqa_root/venv: run bash setup.sh first" >&2
  unset _finqa_root
  return 1
fi
. "$_finqa_root/venv/bin/activate"
echo "venv active ($(python --version 2>&1)). Next: bash download.sh --from ../shared/data/finqa-sample; python -m pytest -q"
unset _finqa_root
