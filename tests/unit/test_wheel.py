"""The wheel carries what vmrun reads at run time: vmtemplates/ where templates.py looks."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_wheel_carries_vmtemplates(tmp_path):
    # Built from a copy: setuptools writes build/ and *.egg-info into the source tree.
    source = tmp_path / "src"
    source.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("vmrun", "guest", "vmtemplates"):
        shutil.copytree(REPO / name, source / name, ignore=ignore)
    # No build isolation: setuptools is already here, and no index is needed.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(source)], check=True, capture_output=True, timeout=120)
    [wheel] = (tmp_path / "dist").glob("vmrun-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    definitions = sorted(p.name for p in (REPO / "vmtemplates").glob("*.toml"))
    assert "default.toml" in definitions
    for name in definitions:
        assert f"vmtemplates/{name}" in names
    assert "vmrun/agent/agent.proto" in names

    # Installed, the code finds them where it reads them.
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target",
                    str(target), str(wheel)], check=True, capture_output=True, timeout=120)
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import vmrun.hypervisor.templates as t; "
             "assert t.__file__.startswith(sys.argv[1]), t.__file__; "
             "print(t.TemplateDefinition.load('default').name)")
    result = subprocess.run([sys.executable, "-c", probe, str(target)], capture_output=True, text=True,
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""}, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "default"
