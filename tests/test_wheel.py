"""The built wheel installs everything under the ``sparvar`` namespace, configs included."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_layout_and_resources(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True)
    wheel = next(tmp_path.glob("sparvar-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"sparvar"}
    for pkg in ("reference", "kernels", "autotune", "tuned_configs"):
        assert f"sparvar/{pkg}/__init__.py" in names
    shipped = [n for n in names if n.startswith("sparvar/tuned_configs/") and n.endswith(".json")]
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                    str(wheel)], check=True)
    probe = (
        "import importlib.resources as r, sparvar, sparvar.reference, sparvar.kernels, sparvar.autotune\n"
        "files = sorted(p.name for d in r.files('sparvar.tuned_configs').iterdir() if d.is_dir()\n"
        "               for p in d.iterdir() if p.name.endswith('.json'))\n"
        "print(sparvar.__file__); print(len(files))\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, check=True, capture_output=True,
                         text=True, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}).stdout.split()
    assert out[0].startswith(str(target))
    assert int(out[1]) == len(shipped)
