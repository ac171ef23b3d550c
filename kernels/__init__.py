"""fastprobe's Triton kernels, installed as fastprobe.kernels (no top-level `kernels` is installed)."""

if __name__ == "kernels":
    # Imported as a top-level module: a source checkout's root is on sys.path (python -m pytest or
    # python run from the checkout), and this folder shadows the Hugging Face `kernels` package,
    # which transformers >= 5.25 imports when it is installed ("cannot import name 'CUDAProperties'
    # from 'kernels'"). Hand the import over to that package, found on the rest of sys.path; the
    # import system returns what sys.modules holds once this module has run.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [entry for entry in sys.path if os.path.abspath(entry or os.getcwd()) != _checkout]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is not None and _spec.loader is not None:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _module
        try:
            _spec.loader.exec_module(_module)
        except BaseException:
            sys.modules.pop("kernels", None)
            raise
