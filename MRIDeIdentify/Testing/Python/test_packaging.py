"""The plain (non-editable) wheel: what `pip install mrideidentify` gives a data manager must run `remodel`.

The tests build the wheel from this checkout with the environment's own setuptools (no network), unpack it
into a bare folder and use the engine from there, away from the source tree.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
ENGINE = REPO / "MRIDeIdentify" / "MRIDeIdentifyLib"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # The build folder is kept out of the checkout so that a stale build/ cannot leak into the wheel.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "--wheel-dir",
            str(out),
            str(REPO),
        ],
        check=True,
        cwd=out,
        capture_output=True,
    )
    (built,) = out.glob("mrideidentify-*.whl")
    return built


def test_wheel_holds_every_engine_file_and_the_weights(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    engine = {
        f"MRIDeIdentifyLib/{p.relative_to(ENGINE).as_posix()}"
        for p in ENGINE.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert engine - names == set(), f"missing from the wheel: {sorted(engine - names)}"
    for name in ("cdeidgan64.safetensors", "cdeidgan64.json", "MODEL_CARD.md"):
        assert f"MRIDeIdentifyLib/weights/{name}" in names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "mri-deidentify = MRIDeIdentifyLib.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_installed_wheel_loads_the_default_weights(wheel, tmp_path):
    zipfile.ZipFile(wheel).extractall(tmp_path)
    code = (
        "import MRIDeIdentifyLib.model as m; g, c, sha = m.load_generator(); "
        "print(m.__file__); print(m.DEFAULT_WEIGHTS); print(sha)"
    )
    # -I -S: no site processing, so neither the checkout nor the editable install's finder is on the path;
    # the environment's site-packages is added back, behind the unpacked wheel, for torch and the rest.
    site = next(p for p in sys.path if p.endswith("site-packages"))
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", f"import sys; sys.path[:0] = [{str(tmp_path)!r}, {site!r}]; " + code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    module_file, weights, sha = done.stdout.split()
    assert Path(module_file).is_relative_to(tmp_path) and Path(weights).is_relative_to(tmp_path)
    assert len(sha) == 64
