#!/usr/bin/env bash
# Install backdoor-bench and its dependencies into the current Python (>= 3.11).
# torch/torchvision are pinned to a known-good pair; everything else comes from pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
python -m pip install -q -e ".[test]"
