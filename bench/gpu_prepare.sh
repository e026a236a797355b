#!/usr/bin/env bash
# Run on the development machine before handing the repository to a GPU machine that has no package
# registry (the device tool's): puts into .gpu/ (git-ignored; name it in the call's `carry`) the wheels
# of what bertpipe needs beyond that machine's PyTorch image (pydantic and ruamel.yaml, for Python 3.12
# on x86-64 Linux, and sentencex) and the WikiText-2 sample the checks build the stand-in corpus from.
#   bash bench/gpu_prepare.sh [PYTHON_VERSION]        (default 3.12, the image's python3)
set -euo pipefail
cd "$(dirname "$0")/.."
python_version="${1:-3.12}"
python="${BERTPIPE_PYTHON:-python3}"
if [ -x .venv/bin/python ]; then python=.venv/bin/python; fi  # the checkout's venv: its resolved versions
packages=(pydantic pydantic-core annotated-types typing-inspection typing-extensions ruamel.yaml sentencex)
pins=()
for name in "${packages[@]}"; do
  pins+=("$name==$("$python" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")")
done
rm -rf .gpu/wheels && mkdir -p .gpu/wheels
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$python_version" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .gpu/wheels "${pins[@]}"
sample="${BERTPIPE_WIKITEXT:-../shared/data/wikitext-2}"
rm -rf .gpu/wikitext-2 && mkdir -p .gpu/wikitext-2
cp "$sample"/wiki.valid.tokens "$sample"/wiki.test.tokens .gpu/wikitext-2/
du -sh .gpu
ls .gpu/wheels
