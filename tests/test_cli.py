"""The fastprobe command: info reports the backends and versions, the demo's op sections check
themselves against the float64 reference on small problems, and bad arguments are refused."""

import pytest
import torch

from fastprobe import cli
from fastprobe.backend import cpp_status


def test_info(capsys):
    assert cli.main(["info"]) == 0
    printed = dict(line.split("  ", 1) for line in capsys.readouterr().out.splitlines())
    assert printed["fastprobe"].strip() == __import__("fastprobe").__version__
    assert printed["cpp (CPU)"].strip().startswith("available" if cpp_status()[0] else "unavailable")
    assert printed["torch"].strip() == torch.__version__
    assert {"triton (CUDA)", "pandas (method tables)", "python"} <= {name.strip() for name in printed}


@pytest.mark.parametrize("section", ["divergence", "concepts", "bridge"])
def test_demo_op_sections_pass_their_checks(section, capsys):
    device, seed = torch.device("cpu"), 0
    run = {
        "divergence": lambda: cli._demo_divergence(device, num_drafts=3, num_tokens=17, vocab=301, seed=seed),
        "concepts": lambda: cli._demo_concepts(device, num_tokens=17, vocab=301, num_concepts=9, seed=seed),
        "bridge": lambda: cli._demo_bridge(device, num_tokens=17, vocab=301, seed=seed),
    }[section]
    assert run()
    printed = capsys.readouterr().out
    assert "OK" in printed and "FAILED" not in printed


NO_CUDA = [] if torch.cuda.is_available() else [["sinks", "--model", "m", "--texts", "t", "--device", "cuda"],
                                                 ["demo", "--device", "cuda:0"]]


@pytest.mark.parametrize("argv", [[], ["nonsense"], ["sinks"], ["availability", "--model", "m"],
                                  ["sinks", "--model", "m", "--texts", "t", "--prune", "1.5"],
                                  ["demo", "--device", "gpu"], *NO_CUDA])
def test_bad_arguments_exit_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as raised:
        cli.main(argv)
    assert raised.value.code == 2 and "usage" in capsys.readouterr().err
