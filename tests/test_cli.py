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


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "1e31", "x"])
def test_a_bad_temperature_exits_with_usage_before_any_model_loads(value, capsys, monkeypatch):
    """(it was checked by token_uncertainty, after the target and every draft had loaded)"""
    ran = _stub_commands(monkeypatch)
    with pytest.raises(SystemExit) as raised:
        cli.main(["uncertainty", *COMMANDS["uncertainty"], "--temperature", value])
    assert raised.value.code == 2 and not ran
    assert "argument --temperature:" in capsys.readouterr().err


@pytest.mark.parametrize("command, option", [("uncertainty", "--texts"), ("availability", "--questions")])
def test_an_input_file_that_is_not_utf8_is_named(command, option, tmp_path, capsys):
    """(the error was the codec's alone: "'utf-8' codec can't decode byte 0xff ...", no file)"""
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9\n".encode("latin-1"))
    argv = [command, *COMMANDS[command]]
    argv[argv.index(option) + 1] = str(latin1)
    assert cli.main(argv) == 2
    assert f"error: {latin1} is not UTF-8 text" in capsys.readouterr().err


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Local checkpoint folders of tiny Llamas: the target and a draft with the target's tokenizer,
    a draft whose tokenizer gives the same tokens other ids, and a model without a tokenizer."""
    from fastprobe.models import tiny_model, tiny_tokenizer

    root = tmp_path_factory.mktemp("checkpoints")
    tokenizer = tiny_tokenizer()
    other = tiny_tokenizer(texts=["zebra quartz jumps over lazy wolves", "xylophone kayak"])
    folders = {}
    for name, seed, own in [("target", 0, tokenizer), ("draft", 1, tokenizer), ("other_tokenizer", 2, other),
                            ("no_tokenizer", 3, None)]:
        folders[name] = root / name
        tiny_model("llama", vocab_size=len(tokenizer), seed=seed).save_pretrained(folders[name])
        if own is not None:
            own.save_pretrained(folders[name])
    texts = root / "texts.txt"
    texts.write_text("The river ran past the mill.\nStars\n")
    return {name: str(path) for name, path in folders.items()}, str(texts)


def _uncertainty(folders, texts, target, *drafts) -> list:
    return ["uncertainty", "--target", folders[target], "--drafts", *(folders[d] for d in drafts), "--texts", texts,
            "--no-progress"]


def test_a_draft_with_another_tokenizer_is_refused(checkpoints, capsys):
    """A draft checkpoint whose tokenizer gives the target's tokens other ids: refused by name (a
    vocabulary of the same size was scored silently, its ids meaning other tokens); a draft
    without a tokenizer is taken on trust."""
    folders, texts = checkpoints
    assert cli.main(_uncertainty(folders, texts, "target", "draft", "other_tokenizer")) == 2
    error = capsys.readouterr().err
    assert f"--drafts {folders['other_tokenizer']}: its tokenizer is not the target's" in error
    assert cli.main(_uncertainty(folders, texts, "target", "draft", "no_tokenizer")) == 0


def test_no_progress_switches_off_the_checkpoint_loading_bars(checkpoints, capsys):
    """--no-progress: nothing on stderr (transformers' 'Loading weights' bars were), and
    transformers' bars are on again afterwards."""
    from transformers.utils import logging as transformers_logging

    folders, texts = checkpoints
    assert cli.main(_uncertainty(folders, texts, "target", "draft")) == 0
    printed = capsys.readouterr()
    assert "2 texts" in printed.out and printed.err == ""
    assert transformers_logging.is_progress_bar_enabled()


def test_a_target_without_a_tokenizer_is_named(checkpoints, capsys):
    """(the error was transformers' alone, a few lines on converting slow tokenizers, no folder),
    on one line whatever transformers raises (4.x without protobuf: an ImportError naming it,
    which escaped as that alone)"""
    folders, texts = checkpoints
    assert cli.main(_uncertainty(folders, texts, "no_tokenizer", "draft")) == 2
    error = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(error) == 1 and f"error: {folders['no_tokenizer']}: no tokenizer could be loaded" in error[0]
    assert error[0].endswith(")")  # transformers' reason, closed on the same line


@pytest.mark.parametrize("command", ["sinks", "uncertainty", "availability"])
def test_a_csv_path_that_is_a_folder_is_refused_before_any_model_loads(command, tmp_path, capsys):
    """(it was found when the table was written, after the whole run: "[Errno 21] Is a directory")"""
    assert cli.main([command, *COMMANDS[command], "--csv", str(tmp_path)]) == 2
    assert f"error: {tmp_path} is a folder" in capsys.readouterr().err
