"""What an install with the runtime dependencies alone (torch, numpy; no transformers, tqdm,
pandas) and a source checkout never built do, each probed in a fresh interpreter: `import
fastprobe` stays light and leaves the process alone, missing optional packages are named, and the
slow reference path is announced rather than taken in silence."""

import json
import subprocess
import sys


def _run(code: str) -> list:
    """The probe's stdout lines (it must exit 0)."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


IMPORT = """
import json, os, sys
import torch
before_modules, before_env = set(sys.modules), dict(os.environ)
import fastprobe
new = sorted(m for m in set(sys.modules) - before_modules if not m.startswith("fastprobe"))
changed = sorted(k for k in set(before_env) | set(os.environ) if before_env.get(k) != os.environ.get(k))
print(json.dumps({"new": new, "env": changed}))
"""


def test_import_loads_no_compiler_stack_nor_optional_packages_and_leaves_the_environment():
    """torch.compiler.assume_constant_result as a decorator imported torch._dynamo (with sympy,
    torch._inductor and triton: ~1 s, as long as torch's own import) and set
    TORCHINDUCTOR_CACHE_DIR in os.environ, which child processes inherit."""
    report = json.loads(_run(IMPORT)[-1])
    heavy = {"torch._dynamo", "torch._inductor", "triton", "sympy", "transformers", "pandas", "matplotlib", "tqdm"}
    assert heavy.isdisjoint(report["new"]), sorted(heavy & set(report["new"]))
    assert report["env"] == []


WITHOUT_TRANSFORMERS = """
import sys
sys.modules["transformers"] = None  # as if not installed: `import transformers` raises ImportError
import torch, fastprobe
from fastprobe.integrations import is_patched
model = torch.nn.Linear(2, 2)
print(is_patched(model))
fastprobe.unpatch(model)
try:
    fastprobe.patch(model)
except ImportError as error:
    print(error)
"""


def test_patch_without_transformers_names_the_package_to_install():
    """(A bare "No module named 'transformers'" came from unwrapping the model, before the check
    that says what to install.)"""
    patched, message = _run(WITHOUT_TRANSFORMERS)
    assert patched == "False"
    assert message == "fastprobe.patch needs transformers: pip install 'transformers>=4.53'"


WITHOUT_TQDM = """
import sys
sys.modules["tqdm"] = None  # as if not installed
import torch
from fastprobe.methods import probes
features = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
probe = probes.train_probe(features, (features[:, 0] > 0).long(), epochs=2, progress=False)
print(tuple(probes.predict(probe, features).shape))
"""


def test_train_probe_without_progress_needs_no_tqdm():
    assert _run(WITHOUT_TQDM) == ["(32,)"]


UNBUILT = """
import sys, warnings
sys.modules["fastprobe._C"] = None  # as in a checkout never built: `from . import _C` raises ImportError
import torch, fastprobe
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    fastprobe.draft_divergence(torch.randn(2, 3, 5))
    fastprobe.draft_divergence(torch.randn(2, 3, 5))
    with fastprobe.use_backend("reference"):
        fastprobe.draft_divergence(torch.randn(2, 3, 5))
for warning in caught:
    print(warning.message)
"""


def test_auto_without_the_extension_says_once_that_cpu_tensors_run_the_reference():
    """A checkout never built (or python run in its root, shadowing an installed copy) ran CPU
    tensors through the PyTorch reference in silence: ~100x slower for draft_divergence."""
    messages = _run(UNBUILT)
    assert len(messages) == 1 and "slow PyTorch reference" in messages[0] and "pip install -e ." in messages[0]


UNBUILT_WHERE = """
import sys, warnings
sys.modules["fastprobe._C"] = None
import torch, fastprobe
from fastprobe import backend
q, logits = torch.randn(1, 2, 3, 4), torch.randn(3, 5)
concepts = fastprobe.ConceptSet.from_ids([[1, 2]])
for call in (lambda: fastprobe.draft_divergence(torch.randn(2, 3, 5)), lambda: fastprobe.sink_attention(q, q, q),
             lambda: fastprobe.concept_mass(logits, concepts), lambda: fastprobe.bridge_loss(logits, logits, beta=0.5)):
    backend._warn_no_cpp.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    print(*[warning.filename for warning in caught])
"""


def test_the_slow_reference_warning_points_at_the_callers_line():
    """The warning's location is the user's call of the op (here the probe's "<string>"), not a
    line inside fastprobe or torch's custom-op dispatch (it was fastprobe/ops/_common.py's
    `return self.body(*args, **kwargs)` or attention.py's: a fixed stacklevel=4 counted frames
    that differ from op to op)."""
    assert _run(UNBUILT_WHERE) == ["<string>"] * 4
