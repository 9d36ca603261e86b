#!/usr/bin/env bash
# Set-up of .venv (safe to re-run; an existing .venv is reused, not rebuilt):
# 1. creates .venv with $PYTHON (default python3) if .venv/bin/python is missing, and upgrades pip;
# 2. torch: only if `import torch` fails in .venv, runs `pip install torch==2.13.0` from whatever
#    index / find-links pip is configured with (no --index-url of its own), so the build it gets
#    depends on that configuration: from pypi.org on Linux x86_64 it is the CUDA build (GBs with its
#    nvidia-* wheels); where pip's configuration offers a CPU wheel (e.g. torch-2.13.0+cpu in a
#    find-links directory, as on this project's development machine) it is that one. A torch already
#    importable in .venv is kept as it is, whatever its version or build, unless step 3 must replace
#    it to satisfy torch>=2.4. To choose the build, create .venv and install torch into it first, e.g.
#    `python3 -m venv .venv && .venv/bin/python -m pip install torch==2.13.0 \
#       --index-url https://download.pytorch.org/whl/cpu`, then run this script;
# 3. `pip install -e ".[test,integrations]"`: hcrlhf in editable mode with its dependencies, the test
#    extras and the integrations extra (trl==1.16.0, for hcrlhf.integrations.apply_to_trl and its tests)
#    from the same index, compiling the C++ extension hcrlhf._C unless HCRLHF_SKIP_EXT=1 is set; then
#    prints whether the extension loads;
# 4. the peer libraries verl and OpenRLHF (requirements/peers.txt, pinned, `--no-deps`: their own pins
#    conflict with ours; requirements/peers-imports.txt is what importing their pure-torch modules needs),
#    for hcrlhf.integrations.apply_to_verl / apply_to_openrlhf, their tests and the benchmarks.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install --quiet torch==2.13.0
fi
.venv/bin/python -m pip install --quiet -e ".[test,integrations]"
.venv/bin/python -m pip install --quiet -r requirements/peers-imports.txt
.venv/bin/python -m pip install --quiet --no-deps --no-build-isolation -r requirements/peers.txt
.venv/bin/python -c "import hcrlhf, hcrlhf.ops; print('hcrlhf', hcrlhf.__version__, '| C++ extension built:', hcrlhf.ops.cpp_available())"
