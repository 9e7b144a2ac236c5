#!/usr/bin/env bash
# Installs the project into a virtual environment (.venv); safe to re-run (each step checks before it installs).
#   bash scripts/setup.sh          torch, triton, numpy and `pip install -e .` (the BERT vocabulary ships in the
#                                  package): what the main job (python -m engine.main) and the console commands need
#   bash scripts/setup.sh --dev    the same with the test extras, DeepSpeed and the [data] extra (NVIDIA DALI,
#                                  nvidia-dali-cuda130: the "dali" loader and its tests)
# Environment:
#   LXMERT_PYTHON      the interpreter that builds the venv (default python3; Python 3.10 to 3.13)
#   LXMERT_VENV        the venv's directory, relative to the checkout (default .venv)
#   LXMERT_TORCH_SPEC  pip's arguments for torch when the venv has none (default torch==2.13.0, which on Linux
#                      x86-64 is PyPI's CUDA build, several GB, that also runs on the CPU; the CPU build is
#                      "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu")
# The venv sees the system site-packages, so a torch already installed (a CUDA torch on a GPU machine) is used and
# never replaced. PIP_INDEX_URL and the rest of pip's environment pass through.

torch_spec=${LXMERT_TORCH_SPEC:-torch==2.13.0}
triton_version=3.6.0  # the version CUDA builds of torch 2.11 ship with; the CPU torch ships none
deepspeed_spec=deepspeed==0.19.8

# What the venv holds, one "name version" line each ("name -" when absent or broken), in one Python start-up.
# torch, triton and numpy report the version pip knows, from the distribution's metadata: PyPI's CUDA torch
# imports as 2.13.0+cu130 (torch-build below) while pip knows it as 2.13.0.
probe_code='
import importlib, importlib.metadata as metadata, sys
print("python", "%d.%d" % sys.version_info[:2])
for name in ("torch", "triton", "numpy"):
    try:
        module = importlib.import_module(name)
    except Exception:
        print(name, "-")
        continue
    try:
        print(name, metadata.version(name))
    except metadata.PackageNotFoundError:
        print(name, module.__version__)
for name in ("lxmert-engine", "nvidia-dali-cuda130", "deepspeed"):
    try:
        print(name, metadata.version(name))
    except metadata.PackageNotFoundError:
        print(name, "-")
torch = importlib.import_module("torch")  # fails only when torch does not import: then no summary is owed
print("torch-build", torch.__version__)
print("device", torch.cuda.get_device_name(0).replace(" ", "_") if torch.cuda.is_available() else "cpu")
'
probe() { state=$("$py" -c "$probe_code" 2>/dev/null || true); }
have() { awk -v name="$1" '$1 == name { v = $2 } END { print (v == "" ? "-" : v) }' <<<"$state"; }
changed=0
pip_install() { "$py" -m pip install -q --disable-pip-version-check "$@"; changed=1; }

# The constraint that holds the venv's torch in place while pip resolves the project's requirements. It names the
# version pip knows, not torch.__version__: pinning PyPI's CUDA torch as torch==2.13.0+cu130 is
# ResolutionImpossible, since no distribution carries that version.
torch_constraint() { echo "torch==$(have torch)"; }

# numpy for the Triton interpreter (CPU machines): numpy 2.4.x breaks triton 3.6's interpreter on loops whose
# bound is a runtime int ("only 0-dimensional arrays ..."); 2.3.5 needs Python 3.11, and 2.2.6 is the last
# numpy for Python 3.10.
numpy_pin() { if [ "$(have python)" = 3.10 ]; then echo 2.2.6; else echo 2.3.5; fi; }

main() {
  set -euo pipefail
  local dev=0 arg
  for arg in "$@"; do
    case "$arg" in
      --dev) dev=1 ;;
      -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
      *) echo "setup.sh: unknown argument '$arg' (use --dev)" >&2; exit 2 ;;
    esac
  done
  cd "$(dirname "${BASH_SOURCE[0]}")/.."

  venv=${LXMERT_VENV:-.venv}
  py=$venv/bin/python
  [ -x "$py" ] || "${LXMERT_PYTHON:-python3}" -m venv --system-site-packages "$venv"

  probe
  case "$(have python)" in
    -|2.*|3.[0-9])
      echo "setup.sh: Python 3.10 or newer is needed; $venv/bin/python is $("$py" -V 2>&1 || echo broken)" >&2
      exit 1 ;;
  esac
  if [ "$(have torch)" = - ]; then
    local torch_args
    read -ra torch_args <<<"$torch_spec"
    pip_install "${torch_args[@]}"
    probe  # a CUDA torch brings its own triton
  fi
  local torch_version
  torch_version=$(have torch)
  if [ "$torch_version" = - ]; then
    echo "setup.sh: torch does not import in $venv after installing $torch_spec" >&2
    exit 1
  fi
  [ "$(uname -s)" != Linux ] || [ "$(have triton)" != - ] || pip_install "triton==$triton_version"
  # the pin matters to the Triton interpreter, i.e. without a GPU; a GPU machine keeps the numpy it has
  [ "$(have device)" != cpu ] || [ "$(have numpy)" = "$(numpy_pin)" ] || pip_install "numpy==$(numpy_pin)"

  # The editable install is redone only when pyproject.toml changes: a stamp inside the venv keeps its hash.
  local extras stamp want
  extras=$([ "$dev" = 1 ] && echo "[dev,data]" || true)
  stamp=$venv/.lxmert-install$extras
  want="$(sha256sum pyproject.toml | cut -d' ' -f1) $PWD"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || [ "$(have lxmert-engine)" = - ] ||
     { [ "$dev" = 1 ] && [ "$(have nvidia-dali-cuda130)" = - ]; }; then
    constraints=$(mktemp)
    trap 'rm -f "$constraints"' EXIT
    torch_constraint >"$constraints"
    pip_install -c "$constraints" -e ".$extras"
    echo "$want" >"$stamp"
    if [ "$dev" = 1 ]; then echo "$want" >"$venv/.lxmert-install"; fi  # [dev,data] includes the plain install
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
  echo "lxmert-engine ready in $venv: torch $(have torch-build), triton $(have triton), numpy $(have numpy)," \
    "device $(have device | tr _ ' ')"
}

# Sourced (`source scripts/setup.sh`), it only defines the functions above: tests/test_setup_script.py calls them.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then main "$@"; fi
