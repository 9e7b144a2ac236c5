#!/usr/bin/env bash
# Installs the project into .venv; safe to re-run (each step checks before it installs).
#   bash scripts/setup.sh          torch, triton, numpy, `pip install -e .` and the offline BERT vocabulary: what the
#                                  main job (python -m engine.main) and the console commands need
#   bash scripts/setup.sh --dev    the same with the test extras, DeepSpeed and the [data] extra (NVIDIA DALI,
#                                  nvidia-dali-cuda130: the "dali" loader and its tests)
# The venv sees the system site-packages, so a CUDA torch already on a GPU machine is used and never replaced.
# Without one, the CPU build torch==2.13.0 goes in (override with LXMERT_TORCH_SPEC; PIP_EXTRA_INDEX_URL and
# the rest of pip's environment pass through).
set -euo pipefail

dev=0
for arg in "$@"; do
  case "$arg" in
    --dev) dev=1 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown argument '$arg' (use --dev)" >&2; exit 2 ;;
  esac
done

cd "$(dirname "${BASH_SOURCE[0]}")/.."

torch_spec=${LXMERT_TORCH_SPEC:-torch==2.13.0}
triton_version=3.6.0  # the version CUDA builds of torch 2.11 ship with; the CPU torch ships none
numpy_version=2.3.5   # numpy 2.4.x breaks triton 3.6's interpreter (CPU machines only)
deepspeed_spec=deepspeed==0.19.8

py=.venv/bin/python
[ -x "$py" ] || python3 -m venv --system-site-packages .venv

# What the venv holds, one "name version" line each ("name -" when absent or broken), in one Python start-up.
probe_code='
import importlib, importlib.metadata as metadata
for name in ("torch", "triton", "numpy"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception:
        print(name, "-")
for name in ("lxmert-engine", "nvidia-dali-cuda130", "deepspeed"):
    try:
        print(name, metadata.version(name))
    except metadata.PackageNotFoundError:
        print(name, "-")
torch = importlib.import_module("torch")  # fails only when torch does not import: then no summary is owed
print("device", torch.cuda.get_device_name(0).replace(" ", "_") if torch.cuda.is_available() else "cpu")
'
probe() { state=$("$py" -c "$probe_code" 2>/dev/null || true); }
have() { awk -v name="$1" '$1 == name { v = $2 } END { print (v == "" ? "-" : v) }' <<<"$state"; }
changed=0
pip_install() { "$py" -m pip install -q --disable-pip-version-check "$@"; changed=1; }

probe
if [ "$(have torch)" = - ]; then
  pip_install "$torch_spec"
  probe  # a CUDA torch brings its own triton
fi
torch_version=$(have torch)
if [ "$torch_version" = - ]; then
  echo "setup.sh: torch does not import in .venv after installing $torch_spec" >&2
  exit 1
fi
[ "$(uname -s)" != Linux ] || [ "$(have triton)" != - ] || pip_install "triton==$triton_version"
# the pin matters to the Triton interpreter, i.e. without a GPU; a GPU machine keeps the numpy it has
[ "$(have device)" != cpu ] || [ "$(have numpy)" = "$numpy_version" ] || pip_install "numpy==$numpy_version"

# The editable install is redone only when setup.py changes: a stamp inside the venv keeps its hash.
extras=$([ "$dev" = 1 ] && echo "[dev,data]" || true)
stamp=.venv/.lxmert-install$extras
want="$(sha256sum setup.py | cut -d' ' -f1) $PWD"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || [ "$(have lxmert-engine)" = - ] ||
   { [ "$dev" = 1 ] && [ "$(have nvidia-dali-cuda130)" = - ]; }; then
  # Pinning the torch in place keeps pip from replacing it while it resolves the project's requirements.
  constraints=$(mktemp)
  trap 'rm -f "$constraints"' EXIT
  echo "torch==$torch_version" >"$constraints"
  pip_install -c "$constraints" -e ".$extras"
  echo "$want" >"$stamp"
  if [ "$dev" = 1 ]; then echo "$want" >.venv/.lxmert-install; fi  # [dev,data] includes the plain install
fi
# DeepSpeed (the engine's distributed path and its tests) is an sdist: built after torch, without its C++ ops
# (they JIT-build on first use), never from a prebuilt wheel (--only-binary picks an ancient 0.3.1)
[ "$dev" = 0 ] || [ "$(have deepspeed)" != - ] || DS_BUILD_OPS=0 pip_install --no-build-isolation "$deepspeed_spec"

if [ "$changed" = 1 ]; then
  probe
  if [ "$(have torch)" != "$torch_version" ]; then
    echo "setup.sh: torch changed from $torch_version to $(have torch) during the install" >&2
    exit 1
  fi
fi
echo "lxmert-engine ready in .venv: torch $(have torch), triton $(have triton), numpy $(have numpy)," \
  "device $(have device | tr _ ' ')"
