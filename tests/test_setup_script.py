"""scripts/setup.sh's pins, through its own functions (the script, sourced, only defines them) and pip's resolver.

PyPI's torch for Linux x86-64 is a CUDA build whose torch.__version__ carries a local label ("2.13.0+cu130") that
its distribution's metadata, the version pip knows, lacks ("2.13.0"). A stand-in torch with that split, installed
in a throwaway venv by the venv's own pip with no configuration and no index, shows that the constraint setup.sh
writes resolves and that pinning torch.__version__ does not.
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

SETUP = Path(__file__).resolve().parents[1] / "scripts" / "setup.sh"
# an ordinary pip: no configuration file, no find-links or index from the environment
ORDINARY_PIP = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")} | {
    "PIP_CONFIG_FILE": os.devnull,
    "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    "PIP_NO_INPUT": "1",
}


def setup_functions(script: str, *args: str) -> str:
    """Runs `script` in bash after sourcing setup.sh; its stdout."""
    proc = subprocess.run(
        ["bash", "-c", f'source "{SETUP}"\n{script}', "bash", *args], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def write_wheel(directory: Path, name: str, version: str, files: dict[str, str], requires: tuple[str, ...] = ()):
    """A pure-Python wheel written by hand (no build backend): the files, METADATA, WHEEL and RECORD."""
    dist_info = f"{name.replace('-', '_')}-{version}.dist-info"
    files = {
        **files,
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        + "".join(f"Requires-Dist: {r}\n" for r in requires),
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        data = text.encode()
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}\n")
    files[f"{dist_info}/RECORD"] = "".join(record) + f"{dist_info}/RECORD,,\n"
    directory.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(directory / f"{name.replace('-', '_')}-{version}-py3-none-any.whl", "w") as wheel:
        for path, text in files.items():
            wheel.writestr(path, text)


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory) -> tuple[Path, Path]:
    """(a venv holding the stand-in CUDA torch, the wheel directory standing in for PyPI)."""
    work = tmp_path_factory.mktemp("setup_pins")
    wheels = work / "wheels"
    write_wheel(
        wheels,
        "torch",
        "2.13.0",
        {
            "torch/__init__.py": 'from . import cuda\n\n__version__ = "2.13.0+cu130"\n',
            "torch/cuda.py": "def is_available():\n    return False\n",
        },
    )
    write_wheel(wheels, "needs-torch", "1.0", {"needs_torch/__init__.py": ""}, requires=("torch>=2.4",))
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip(venv, "install", "--no-index", "--find-links", str(wheels), "torch")
    return venv, wheels


def pip(venv: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", *args],
        capture_output=True,
        text=True,
        env=ORDINARY_PIP,
        timeout=120,
    )
    assert proc.returncode == 0 or not check, proc.stdout + proc.stderr
    return proc


def test_the_torch_pin_is_the_version_pip_knows(stand_in, tmp_path):
    venv, wheels = stand_in
    constraint, build = setup_functions(
        "py=$1; probe; torch_constraint; have torch-build", str(venv / "bin/python")
    ).split()
    assert (constraint, build) == ("torch==2.13.0", "2.13.0+cu130")

    def resolve(pin: str) -> subprocess.CompletedProcess:
        (tmp_path / "constraints.txt").write_text(pin + "\n")
        return pip(
            venv,
            "install",
            "--dry-run",
            "--no-index",
            "--find-links",
            str(wheels),
            "-c",
            str(tmp_path / "constraints.txt"),
            "needs-torch",
            check=False,
        )

    proc = resolve(constraint)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Would install needs-torch-1.0" in proc.stdout  # and the installed torch stays
    proc = resolve(f"torch=={build}")  # the old pin, torch.__version__
    assert proc.returncode != 0 and "ResolutionImpossible" in proc.stderr, proc.stdout + proc.stderr


@pytest.mark.parametrize("python, numpy", [("3.10", "2.2.6"), ("3.11", "2.3.5"), ("3.12", "2.3.5"), ("3.13", "2.3.5")])
def test_the_numpy_pin_fits_the_python(python, numpy):
    assert setup_functions('state="python $1"; numpy_pin', python).strip() == numpy
