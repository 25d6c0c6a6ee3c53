#!/usr/bin/env bash
# sdlora: the two commands.
#   bash train.sh NAME [--set section.key=value ...]   dataset -> train -> export -> samples for datasets_cfg/NAME.toml
#   bash train.sh --test [pytest args]                 the test suite (what CI runs)
# On a fresh machine both first create .venv and install sdlora into it; later runs reuse it.
set -euo pipefail
cd "$(dirname "$0")"

usage() { echo "usage: bash train.sh NAME [--set section.key=value ...]  |  bash train.sh --test [pytest args]" >&2; exit 2; }
[ $# -ge 1 ] || usage

# torch + torchvision that import together (open_clip needs torchvision); override with SDLORA_TORCH.
TORCH_SPEC=${SDLORA_TORCH:-"torch==2.14.1 torchvision==0.29.1"}
PY=${PYTHON:-python3}
VENV=.venv

bootstrap() {
  if [ ! -x "$VENV/bin/python" ]; then
    echo "train.sh: creating $VENV" >&2
    "$PY" -m venv "$VENV"
  fi
  local stamp="$VENV/.sdlora-installed" want
  want=$(cat pyproject.toml | sha256sum | cut -c1-16)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    if ! "$VENV/bin/python" -c "import torch, torchvision.ops" 2>/dev/null; then
      echo "train.sh: installing $TORCH_SPEC" >&2
      # shellcheck disable=SC2086
      "$VENV/bin/pip" install --quiet $TORCH_SPEC
    fi
    echo "train.sh: installing sdlora and its dependencies into $VENV" >&2
    "$VENV/bin/pip" install --quiet -e ".[test]"
    echo "$want" > "$stamp"
  fi
}

if [ "$1" = "--test" ]; then
  shift
  bootstrap
  exec "$VENV/bin/python" -m pytest "$@"
fi
case "$1" in -*) usage ;; esac

NAME=$1; shift
CFG="datasets_cfg/$NAME.toml"
if [ ! -f "$CFG" ]; then
  echo "train.sh: $CFG not found; available: $(ls datasets_cfg/*.toml 2>/dev/null | xargs -n1 basename 2>/dev/null | sed 's/\.toml$//' | tr '\n' ' ')" >&2
  exit 2
fi
bootstrap
exec "$VENV/bin/sdlora" run "$CFG" "$@"
