#!/usr/bin/env bash
# The suite on an older release set than CI's: a fresh virtual environment with the named releases of torch,
# torchvision, transformers, timm and numpy, cd_convert installed editable with its test extra, then pytest.
# The README's "Versions" section lists what each set gave. Each set downloads about 3 GB of wheels (torch and
# NVIDIA's libraries); the environments go to VENVS (default /tmp/cd_convert_releases).
#
# Usage: tools/old_releases.sh SET [PYTEST_ARGS...]
#   SET: torch2.6 (Triton 3.2, transformers 5), torch2.4 (Triton 3.0, transformers 4.57),
#        torch2.1 (Triton 2.1, transformers 4.46, timm 0.9: the lowest releases pyproject.toml declares)
# numpy stays below 2 in every set: Triton 3.0-3.2's interpreter (the kernel tests on the CPU) needs it.
set -euo pipefail
set_name=${1:?usage: tools/old_releases.sh torch2.6|torch2.4|torch2.1 [PYTEST_ARGS...]}
shift
case "$set_name" in
  torch2.6) pins=("torch==2.6.0" "torchvision==0.21.0" "numpy<2") ;;
  torch2.4) pins=("torch==2.4.1" "torchvision==0.19.1" "transformers<5" "numpy<2") ;;
  torch2.1) pins=("torch==2.1.2" "torchvision==0.16.2" "transformers==4.46.3" "timm==0.9.16" "numpy<2") ;;
  *) echo "unknown set $set_name: torch2.6, torch2.4 or torch2.1" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
venv="${VENVS:-/tmp/cd_convert_releases}/$set_name"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q -e ".[test]" "${pins[@]}"
"$venv/bin/python" -c "import torch, triton, transformers, timm, numpy; print('torch', torch.__version__, \
'| triton', triton.__version__, '| transformers', transformers.__version__, '| timm', timm.__version__, \
'| numpy', numpy.__version__)"
if [ -d ../shared/datasets ]; then export CD_CONVERT_DATA="$(cd ../shared/datasets && pwd)"; fi
export MPLBACKEND=Agg
exec "$venv/bin/python" -m pytest -q -rf -p no:cacheprovider "$@"
