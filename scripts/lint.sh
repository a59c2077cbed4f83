#!/usr/bin/env bash
# Lint, format check and type check of the three packages (placement/, moetrain/, cluster/), with
# the tools and settings pinned in pyproject.toml. scripts/test.sh runs this before the whole suite;
# run it alone with `bash scripts/lint.sh` (after `bash scripts/setup.sh test`).
set -euo pipefail
cd "$(dirname "$0")/.."
# The tree is formatted with `ruff format placement moetrain cluster`: an unformatted file fails.
FORMAT_CHECK=1
PKGS=(placement moetrain cluster)
echo "lint: ruff check ${PKGS[*]}"
.venv/bin/ruff check --no-cache "${PKGS[@]}"
if [ "$FORMAT_CHECK" = 1 ]; then
    echo "lint: ruff format --check ${PKGS[*]}"
    .venv/bin/ruff format --no-cache --check "${PKGS[@]}"
fi
echo "lint: mypy ${PKGS[*]}"
.venv/bin/mypy --cache-dir "${MOETRAIN_CACHE_DIR:-.cache/moetrain}/mypy" "${PKGS[@]}"
