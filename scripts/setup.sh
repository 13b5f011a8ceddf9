#!/usr/bin/env bash
# Idempotent setup for a fresh Debian 12 machine: system packages, then .venv with pinned packages.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
[ -d /usr/share/datasets/fashion-mnist ] || need+=(dataset-fashion-mnist)
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
command -v tmux >/dev/null 2>&1 || need+=(tmux)  # a real terminal for the CLI's live display tests
[ -x /usr/lib/postgresql/15/bin/initdb ] || need+=(postgresql)
command -v kubectl >/dev/null 2>&1 || echo "note: kubectl not found; the Kubernetes end-to-end tests need it" >&2
if [ ${#need[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing Debian packages: ${need[*]}" >&2
  $sudo apt-get update -qq || true
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

stamp=.venv/.strata-installed
want=$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  # torch==2.14.1 and torchvision==0.29.1 are pinned in pyproject.toml: never let pip pick a newer CUDA build.
  .venv/bin/python -m pip install -q -e '.[trainer,operator,bench,report,dev]' 2>&1 | grep -v '^WARNING: Location' || true
  .venv/bin/python -c "import torch, torchvision, optuna, kopf, strata, strata_trainer" 
  echo "$want" > "$stamp"
fi
