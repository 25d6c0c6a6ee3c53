#!/usr/bin/env bash
# sdlora: the two commands.
#   bash train.sh NAME [--set section.key=value ...]   dataset -> train -> export -> samples for datasets_cfg/NAME.toml
#   bash train.sh --test [pytest args]                 the test suite (what CI runs)
#   bash train.sh --bench-gpu [OUT.json]               the GPU benchmark suite (JSON + markdown table)
# On a fresh machine both first create .venv and install sdlora into it; later runs reuse it.
set -euo pipefail
cd "$(dirname "$0")"

usage() { echo "usage: bash train.sh NAME [--set section.key=value ...]  |  bash train.sh --test [pytest args]  |  bash train.sh --bench-gpu [OUT.json]" >&2; exit 2; }
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

if [ "$1" = "--bench-gpu" ]; then
  # `sdlora bench --suite gpu`, at most ~8 minutes on one GPU. A machine whose python3 already
  # holds a CUDA torch (a bare GPU box without network) runs it with that python, after
  # installing any wheels carried in .whl/ (e.g. diffusers) into a scratch folder; anywhere
  # else .venv is bootstrapped as for training.
  OUT_JSON=${2:-samples/bench_gpu.json}
  export PYTHONUNBUFFERED=1
  if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    RUN=$PY
    if compgen -G ".whl/*.whl" >/dev/null; then
      SITE=$(mktemp -d)
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl
      export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    fi
    if ! "$RUN" -c "import diffusers, transformers, peft, accelerate, safetensors" 2>/dev/null; then
      echo "train.sh: $PY lacks diffusers/transformers/peft/accelerate/safetensors; carry their wheels in .whl/ (see README, Benchmarks)" >&2
      exit 2
    fi
  else
    bootstrap
    RUN=$VENV/bin/python
  fi
  mkdir -p "$(dirname "$OUT_JSON")"
  set -o pipefail
  "$RUN" -m sdlora.cli bench --suite gpu --json "$OUT_JSON" --overwrite | tee "${OUT_JSON%.json}.md"
  exit $?
fi

if [ "$1" = "--test" ]; then
  shift
  bootstrap
  # One worker per core (pytest-xdist): each test runs on one torch thread (tests/conftest.py), so the
  # suite takes half the time on 2 cores. `-n 0` after --test runs it in this process.
  exec "$VENV/bin/python" -m pytest -n auto "$@"
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
