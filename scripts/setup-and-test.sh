#!/usr/bin/env bash
# Install everything locallearn needs on a fresh machine and run the test suite (the README's test command).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! [ -d /usr/share/datasets/fashion-mnist ]; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null
  else
    echo "note: dataset-fashion-mnist is not installed (needs root); the real-data tests will be skipped" >&2
  fi
fi
python3 -m pip install -q torch==2.14.1 torchvision==0.29.1
python3 -m pip install -q -e ".[test]"
lint-imports --no-cache    # the package's layers (pyproject.toml [tool.importlinter]): no upward import, no circle
python3 -m pytest "$@"
