"""fastprobe's Triton kernels, installed as fastprobe.kernels (no top-level `kernels` is installed)."""

if __name__ == "kernels":
    # Imported as a top-level module: a source checkout's root is on sys.path (python -m pytest or
    # python run from the checkout), and this folder shadows the Hugging Face `kernels` package,
    # which transformers >= 5.25 imports when it is installed ("cannot import name 'CUDAProperties'
    # from 'kernels'"). Hand the import over to that package, found elsewhere on sys.path (not this
    # folder nor a copy of it); the import system returns what sys.modules holds once this module
    # has run.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    with open(__file__, encoding="utf-8") as _this:
        _first_line = _this.readline()

    def _is_this_folder(origin: str) -> bool:
        """Whether a found kernels/__init__.py is this file or a copy of it (another clone's, the
        sanitizer's copy of the tree), which would hand the import back, and so on forever."""
        if os.path.realpath(origin) == os.path.realpath(__file__):
            return True
        try:
            with open(origin, encoding="utf-8") as found:
                return found.readline() == _first_line
        except (OSError, UnicodeDecodeError):
            return False

    _spec = None
    for _entry in sys.path:  # the first regular `kernels` package that is not this folder
        _found = importlib.machinery.PathFinder.find_spec("kernels", [_entry]) if isinstance(_entry, str) else None
        if _found is not None and _found.origin is not None and os.path.isfile(_found.origin) \
                and not _is_this_folder(_found.origin):
            _spec = _found
            break
    if _spec is not None and _spec.loader is not None:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _module
        try:
            _spec.loader.exec_module(_module)
        except BaseException:
            sys.modules.pop("kernels", None)
            raise
