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


@pytest.mark.parametrize("vocab", [301, 3])  # 3: every concept holds nearly all the mass, log_mass ~ 0
@pytest.mark.parametrize("section", ["divergence", "concepts", "bridge"])
def test_demo_op_sections_pass_their_checks(section, vocab, capsys):
    device, seed = torch.device("cpu"), 0
    run = {
        "divergence": lambda: cli._demo_divergence(device, num_drafts=3, num_tokens=17, vocab=vocab, seed=seed),
        "concepts": lambda: cli._demo_concepts(device, num_tokens=17, vocab=vocab, num_concepts=9, seed=seed),
        "bridge": lambda: cli._demo_bridge(device, num_tokens=17, vocab=vocab, seed=seed),
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


COMMANDS = {"demo": [], "sinks": ["--model", "m", "--texts", "t"],
            "uncertainty": ["--target", "m", "--drafts", "d", "--texts", "t"],
            "availability": ["--model", "m", "--questions", "q"]}
INTEGER_OPTIONS = [("demo", "--drafts"), ("demo", "--tokens"), ("demo", "--vocab"), ("demo", "--concepts"),
                   ("demo", "--length"), ("demo", "--seed"), ("sinks", "--top"), ("sinks", "--batch-size"),
                   ("sinks", "--max-length"), ("sinks", "--seed"), ("uncertainty", "--top"),
                   ("uncertainty", "--batch-size"), ("uncertainty", "--max-length"),
                   ("availability", "--max-new-tokens"), ("availability", "--batch-size"),
                   ("availability", "--max-length")]


def _stub_commands(monkeypatch) -> list:
    """Every command replaced by one that records its arguments: what the parser let through."""
    ran = []
    for name in ("demo", "sinks_command", "uncertainty_command", "availability_command"):
        monkeypatch.setattr(cli, name, lambda args: ran.append(args) or 0)
    return ran


@pytest.mark.parametrize("command, option, value", [
    (command, option, value) for command, option in INTEGER_OPTIONS for value in ("-1", "0", "2.5", "x", str(2**63))
    if not (option == "--seed" and value == "0")])
def test_bad_integer_options_exit_with_usage_naming_the_option(command, option, value, capsys, monkeypatch):
    """Counts and sizes must be >= 1, seeds >= 0 (0 is a seed, not a count): anything else ends
    the command with usage (exit 2) naming the option, before any work (they crashed with a
    traceback, the demo's after a minute of it, or printed empty tables: --top 0)."""
    ran = _stub_commands(monkeypatch)
    with pytest.raises(SystemExit) as raised:
        cli.main([command, *COMMANDS[command], option, value])
    assert raised.value.code == 2 and not ran
    assert f"argument {option}: must be" in capsys.readouterr().err


@pytest.mark.parametrize("command, option", INTEGER_OPTIONS)
def test_smallest_integer_options_are_accepted(command, option, monkeypatch):
    ran = _stub_commands(monkeypatch)
    smallest = 0 if option == "--seed" else 1
    assert cli.main([command, *COMMANDS[command], option, str(smallest)]) == 0
    assert getattr(ran[0], option.lstrip("-").replace("-", "_")) == smallest
