"""Running from a source checkout (python -m pytest, python in the checkout's root) puts the
checkout's root on sys.path, where kernels/ (installed as fastprobe.kernels) would shadow the
Hugging Face `kernels` package that transformers >= 5.25 imports when it is installed: the
folder hands a top-level import over to that package."""

import importlib.machinery
import subprocess
import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent

PROBE = """
import sys
sys.path[:0] = [{checkout!r}] + {elsewhere!r}
import kernels
import fastprobe.kernels
from fastprobe.kernels import divergence
print(getattr(kernels, "CUDAProperties", "ours"), kernels.__file__ != fastprobe.kernels.__file__,
      fastprobe.kernels.__name__, divergence.__name__)
"""


def _run(elsewhere: list) -> str:
    code = PROBE.format(checkout=str(CHECKOUT), elsewhere=[str(path) for path in elsewhere])
    done = subprocess.run([sys.executable, "-c", code], cwd=CHECKOUT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_a_top_level_kernels_import_gets_the_installed_kernels_package(tmp_path):
    """(transformers 5.25 with kernels installed failed to import from the checkout: "cannot
    import name 'CUDAProperties' from 'kernels' (.../kernels/__init__.py)")"""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("CUDAProperties = 'hub'\n")
    assert _run([tmp_path]) == ["hub", "True", "fastprobe.kernels", "fastprobe.kernels.divergence"]


def _installed() -> bool:
    """Whether a regular `kernels` package other than a copy of kernels/ is on sys.path."""
    first_line = (CHECKOUT / "kernels" / "__init__.py").read_text().splitlines()[0]
    for entry in sys.path:
        found = importlib.machinery.PathFinder.find_spec("kernels", [entry])
        if found is not None and found.origin and Path(found.origin).is_file() \
                and Path(found.origin).read_text().splitlines()[:1] != [first_line]:
            return True
    return False


def _copy_of_the_tree(path: Path) -> Path:
    """A second copy of the tree's kernels/ at path/kernels (another clone's, the sanitizer's)."""
    (path / "kernels").mkdir(parents=True)
    (path / "kernels" / "__init__.py").write_text((CHECKOUT / "kernels" / "__init__.py").read_text())
    return path


def test_without_a_stand_in_the_import_gets_what_is_installed(tmp_path):
    """The folder imports as itself where no other `kernels` is installed, else as that one."""
    first = _run([tmp_path])[0]
    assert first != "ours" if _installed() else first == "ours"


def test_two_checkouts_on_the_path_do_not_hand_the_import_to_each_other(tmp_path):
    """With a second copy of the tree on sys.path (the sanitizer's, beside an editable install's
    checkout), each kernels/ handed the import to the other, forever (RecursionError): copies of
    the folder are passed over as the folder itself is."""
    other = _copy_of_the_tree(tmp_path / "clone")
    hub = tmp_path / "hub"
    (hub / "kernels").mkdir(parents=True)
    (hub / "kernels" / "__init__.py").write_text("CUDAProperties = 'hub'\n")
    assert _run([other, hub]) == ["hub", "True", "fastprobe.kernels", "fastprobe.kernels.divergence"]
    first = _run([other])[0]
    assert first != "ours" if _installed() else first == "ours"
