#!/usr/bin/env bash
# The GPU path, measured in one call (issue #20): tests on CUDA, the whole pipeline against the CPU
# fp32 golden, throughput and MFU of BERT-base/large at max_len 128 and 512 with each GPU lever on and
# off, DDP scaling over every GPU, and the memory planner against torch.cuda.max_memory_allocated.
# Prints one table last; writes it, the numbers and each part's log under $OUT (or a folder it names).
#
#   bash bench/gpu_check.sh                  # on a machine with NVIDIA GPUs: at most 8 minutes
#   bash bench/gpu_check.sh --device cpu     # the same parts on the CPU in reduced sizes (proves the script)
#
# On a GPU machine without a package registry (the device tool's) run `bash bench/gpu_prepare.sh` here
# first and carry .gpu: it holds the wheels that machine lacks and the WikiText sample.
set -uo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
python="${BERTPIPE_PYTHON:-}"
if [ -z "$python" ]; then  # this checkout's venv where it works here, else the machine's python3 (a GPU image's)
  if .venv/bin/python -c "import torch" 2>/dev/null; then python="$repo/.venv/bin/python"; else python=python3; fi
fi
if ! "$python" -c "import pydantic, ruamel.yaml, sentencex" 2>/dev/null; then
  if ! ls .gpu/wheels/*.whl >/dev/null 2>&1; then
    echo "gpu_check: $python lacks pydantic/ruamel.yaml/sentencex and .gpu/wheels is empty: run bench/gpu_prepare.sh" >&2
    exit 2
  fi
  site="$(mktemp -d "${TMPDIR:-/tmp}/bertpipe-site.XXXXXX")"
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .gpu/wheels/*.whl \
    || exit 2
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! (cd / && "$python" -c "import bertpipe" 2>/dev/null); then  # not installed there: this checkout's package
  export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$python" bench/gpu_check.py "$@"
