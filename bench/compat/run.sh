#!/usr/bin/env bash
# Saved pruned folders must load with the oldest and newest transformers we claim (>=5.0): save tiny non-uniform
# Llama / Qwen2 (q/k/v biases) / Mistral models with the current install, then reload them, without our package, in a
# fresh venv holding transformers 5.0.0 and in the current environment; logits and greedy generation must be equal.
set -euo pipefail
cd "$(dirname "$0")/../.."
python bench/compat/save_tiny.py
[ -x /tmp/venv_tf50/bin/python ] || { python -m venv /tmp/venv_tf50 && /tmp/venv_tf50/bin/pip install -q torch==2.13.0 transformers==5.0.0; }
/tmp/venv_tf50/bin/python bench/compat/load_tiny.py 2>/dev/null | grep "logits equal"
python bench/compat/load_tiny.py 2>/dev/null | grep "logits equal"
