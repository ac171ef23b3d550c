"""pyproject.toml's package mapping: kernels/ (top level in the repository) ships as
fastprobe.kernels, never as a top-level `kernels`, and an editable install (the README's
`pip install -e .`) puts no directory above the checkout on sys.path. The mapping
{"fastprobe/kernels" = "kernels"} in wheel.packages made scikit-build-core write the checkout's
parent into the editable .pth (it strips as many levels from a package's source as its key has
parts), so every process of that environment could import the checkout's sibling folders.

The wheels are built without CMake (wheel.cmake=false: no compile, under a second each), in a
subprocess in the checkout's root, as pip runs the build backend."""

import ast
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

BUILD = """
import json, sys
from scikit_build_core import build
hook = build.build_editable if sys.argv[1] == "editable" else build.build_wheel
print(json.dumps(hook(sys.argv[2], {"wheel.cmake": "false"})))
"""


def _wheel(kind: str, out: Path) -> zipfile.ZipFile:
    skbuild = pytest.importorskip("scikit_build_core")
    if int(skbuild.__version__.split(".")[0]) < 1:
        pytest.skip(f"pyproject.toml needs scikit-build-core >= 1.0 (wheel.force-include), not "
                    f"{skbuild.__version__}")
    if not (ROOT / "fastprobe").is_dir():
        pytest.skip("needs the tree's fastprobe/ sources (tests/sanitize.sh runs the tests beside a copy without them)")
    out.mkdir()
    done = subprocess.run([sys.executable, "-c", BUILD, kind, str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return zipfile.ZipFile(out / json.loads(done.stdout.strip().splitlines()[-1]))


def test_an_editable_install_puts_only_the_checkout_on_sys_path(tmp_path):
    with _wheel("editable", tmp_path / "wheel") as wheel:
        pth = wheel.read("_editable_skbc_fastprobe.pth").decode().splitlines()
        finder = wheel.read("_editable_skbc_fastprobe.py").decode()
    # the import line of the finder, then sys.path entries: the checkout's root, as any package
    # at the top of its checkout needs, and nothing above it
    assert pth == ["import _editable_skbc_fastprobe", str(ROOT)]
    modules = ast.literal_eval(ast.parse(finder.rstrip().splitlines()[-1]).body[0].value.args[0])
    # served live from kernels/ (an edit shows without reinstalling), and only as fastprobe.kernels
    assert modules["fastprobe.kernels"] == str(ROOT / "kernels" / "__init__.py")
    assert modules["fastprobe.kernels.divergence"] == str(ROOT / "kernels" / "divergence.py")
    assert not [name for name in modules if name.partition(".")[0] != "fastprobe"]


def test_a_wheel_has_the_kernels_only_as_fastprobe_kernels(tmp_path):
    with _wheel("wheel", tmp_path / "wheel") as wheel:
        names = wheel.namelist()
    kernels = sorted(path.name for path in (ROOT / "kernels").glob("*.py"))
    assert sorted(name.rpartition("/")[2] for name in names if name.startswith("fastprobe/kernels/")) == kernels
    assert {name.partition("/")[0] for name in names if "/" in name and ".dist-info/" not in name} == {"fastprobe"}
    assert "fastprobe/__init__.py" in names and not [name for name in names if "__pycache__" in name]
