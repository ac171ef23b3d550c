"""fastprobe's C++ extension compiled ahead of bench/gpu.sh, so that the device lease does not pay
for `pip install -e .`'s compile on the GPU machine's CPU.

Here (bench/gpu_wheels.sh, under a Python 3.12, the GPU machine's, with scikit-build-core and
pybind11): an editable wheel of this tree (scikit-build-core's PEP 660 build: the compiled
fastprobe/_C and a finder that maps the package onto the source tree) into WHEEL_DIR, with
STAMP_FILE: the hash of what the extension is built from, the tree's root and the Python tag.

    python -m bench.prebuilt build .whl/fastprobe

There (bench/gpu.sh, before anything imports fastprobe): install that wheel when it was built from
this tree's C++ sources and build files for this Python, point its finder at this checkout (the
source tree is the same, its path is not), and check that fastprobe._C imports; exit 1, with the
reason, where any of it fails, and gpu.sh then runs `pip install -e .` as before.

    python3 -m bench.prebuilt install .whl/fastprobe

Neither imports torch or fastprobe (gpu.sh runs `install` before fastprobe is installed).
"""

import glob
import hashlib
import json
import os
import subprocess
import sys
import sysconfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAMP_FILE = "stamp.json"
# what the compiled extension is made of (CMakeLists.txt compiles csrc/*.cpp; pyproject.toml holds
# the build settings and the package mapping the editable finder is made from)
BUILD_INPUTS = ("CMakeLists.txt", "pyproject.toml", "csrc/*")
# the Python files the finder lists by name (one added or removed after the build would be missed)
PACKAGE_FILES = ("fastprobe/**/*.py", "kernels/**/*.py")


def stamp(root: str = ROOT) -> str:
    """sha256 of the extension's build inputs (names and contents) and of the package's module names."""
    digest = hashlib.sha256()
    for pattern in BUILD_INPUTS:
        for path in sorted(glob.glob(os.path.join(root, pattern))):
            if os.path.isfile(path):
                digest.update(os.path.relpath(path, root).encode() + b"\0")
                with open(path, "rb") as source:
                    digest.update(source.read() + b"\0")
    for pattern in PACKAGE_FILES:
        for path in sorted(glob.glob(os.path.join(root, pattern), recursive=True)):
            digest.update(os.path.relpath(path, root).encode() + b"\0")
    return digest.hexdigest()


def python_tag() -> str:
    return sysconfig.get_config_var("SOABI") or sys.implementation.cache_tag


def build(wheel_dir: str, root: str = ROOT) -> str:
    """The editable wheel of `root` into wheel_dir (emptied first), and its STAMP_FILE; its path."""
    from scikit_build_core.build import build_editable

    os.makedirs(wheel_dir, exist_ok=True)
    for old in os.listdir(wheel_dir):
        os.remove(os.path.join(wheel_dir, old))
    wheel_dir = os.path.abspath(wheel_dir)
    here = os.getcwd()
    os.chdir(root)  # (the build backend builds the project in the working directory)
    try:
        name = build_editable(wheel_dir)
    finally:
        os.chdir(here)
    with open(os.path.join(wheel_dir, STAMP_FILE), "w") as file:
        json.dump({"stamp": stamp(root), "root": os.path.abspath(root), "python": python_tag(), "wheel": name}, file)
    return os.path.join(wheel_dir, name)


def relocate(files: list, built_root: str, root: str) -> int:
    """Point the installed editable finder (its module and .pth: absolute paths of the tree it was
    built from, and of that tree's parent) at `root`; the number of files rewritten."""
    pairs = [(built_root, root), (os.path.dirname(built_root), os.path.dirname(root))]
    rewritten = 0
    for path in files:
        with open(path) as file:
            text = file.read()
        if path.endswith(".pth"):  # one sys.path entry (or an import line) per line
            lines = [dict(pairs).get(line, line) for line in text.split("\n")]
            new = "\n".join(lines)
        else:  # the paths as Python string literals: the tree, a path inside it, its parent
            new = text.replace(repr(built_root + os.sep)[:-1], repr(root + os.sep)[:-1])
            for old, replacement in pairs:
                new = new.replace(repr(old), repr(replacement))
        if new != text:
            with open(path, "w") as file:
                file.write(new)
            rewritten += 1
    return rewritten


def _finder_files() -> list:
    """The installed distribution's editable finder files (module and .pth)."""
    from importlib.metadata import distribution

    dist = distribution("fastprobe")
    return [str(dist.locate_file(entry)) for entry in dist.files or []
            if os.path.basename(str(entry)).startswith("_editable_") and str(entry).endswith((".py", ".pth"))]


def install(wheel_dir: str, root: str = ROOT) -> int:
    """Install the prebuilt editable wheel if it fits this tree and Python (see the docstring);
    0 when fastprobe._C then imports, else 1 (with the reason on stdout)."""
    info_path = os.path.join(wheel_dir, STAMP_FILE)
    if not os.path.exists(info_path):
        print(f"prebuilt fastprobe: none in {wheel_dir} (bench/gpu_wheels.sh builds it)")
        return 1
    with open(info_path) as file:
        info = json.load(file)
    if info["python"] != python_tag():
        print(f"prebuilt fastprobe: built for {info['python']}, this is {python_tag()}")
        return 1
    if info["stamp"] != stamp(root):
        print("prebuilt fastprobe: built from other C++ sources, build files or package modules than this tree's")
        return 1
    wheel = os.path.join(wheel_dir, info["wheel"])
    pip = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile", "--force-reinstall", wheel]
    if subprocess.run(pip).returncode != 0:
        print(f"prebuilt fastprobe: pip could not install {wheel}")
        return 1
    files = _finder_files()
    rewritten = relocate(files, info["root"], os.path.abspath(root))
    check = subprocess.run([sys.executable, "-c", "import fastprobe, fastprobe._C, fastprobe.kernels; "
                            "print(fastprobe.__file__, fastprobe._C.__file__)"], cwd=root, capture_output=True,
                           text=True)
    if check.returncode != 0 or not check.stdout.startswith(os.path.join(os.path.abspath(root), "fastprobe")):
        print(f"prebuilt fastprobe: installed, but it does not import from this tree:\n{check.stdout}{check.stderr[-2000:]}")
        return 1
    print(f"prebuilt fastprobe: {info['wheel']} installed ({len(files)} finder files, {rewritten} pointed at "
          f"{root}); imports {check.stdout.split()[1]}")
    return 0


if __name__ == "__main__":
    command, wheel_dir = sys.argv[1:3]
    if command == "build":
        print(build(wheel_dir))
    elif command == "install":
        sys.exit(install(wheel_dir))
    else:
        sys.exit(f"unknown command {command!r} (build or install)")
