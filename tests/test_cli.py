"""The fastprobe command: info reports the backends and versions, the demo's op sections check
themselves against the float64 reference on small problems, and bad arguments are refused."""

from pathlib import Path

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


@pytest.mark.skipif(not cpp_status()[0], reason="needs the C++ extension")
def test_info_describes_the_cpu_kernels_as_switched_now(cpu_lanes, capsys):
    """info names the lane width and the bfloat16 pair scores in force when it runs (they are
    switched at run time; the description was cached at the first call)."""
    from fastprobe import _C

    for pairs in (False, True):
        previous = _C.set_attention_bf16_pairs(pairs)
        try:
            assert cli.main(["info"]) == 0
            line = dict(line.split("  ", 1) for line in capsys.readouterr().out.splitlines())["cpp (CPU)"]
            assert f"{cpu_lanes}-lane attention" in line
            assert ("bfloat16 scores by AVX512-BF16" in line) == _C.attention_bf16_pairs()
        finally:
            _C.set_attention_bf16_pairs(previous)


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


def smallest(command: str, option: str) -> int:
    """An integer option's smallest value: seeds 0, sinks' --max-length 2 (a token to score and
    one to predict: at 1 every head scored 1.0, then perplexity failed), counts 1."""
    return {"--seed": 0, "--max-length": 2 if command == "sinks" else 1}.get(option, 1)


def _stub_commands(monkeypatch) -> list:
    """Every command replaced by one that records its arguments: what the parser let through."""
    ran = []
    for name in ("demo", "sinks_command", "uncertainty_command", "availability_command"):
        monkeypatch.setattr(cli, name, lambda args: ran.append(args) or 0)
    return ran


@pytest.mark.parametrize("command, option, value", [
    (command, option, value) for command, option in INTEGER_OPTIONS
    for value in ("-1", str(smallest(command, option) - 1), "2.5", "x", str(2**63))
    if value != "-1" or option != "--seed"])
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
    assert cli.main([command, *COMMANDS[command], option, str(smallest(command, option))]) == 0
    assert getattr(ran[0], option.lstrip("-").replace("-", "_")) == smallest(command, option)


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
    assert f"error: {option} {latin1} is not UTF-8 text" in capsys.readouterr().err


@pytest.mark.parametrize("command, option", [("sinks", "--texts"), ("uncertainty", "--texts"),
                                             ("availability", "--questions")])
def test_an_input_file_that_is_missing_or_a_folder_is_named_with_its_option(command, option, tmp_path, capsys):
    """(the error was the OS's alone: "[Errno 2] No such file or directory: 'nope.txt'")"""
    for path, says in ((tmp_path / "nope.txt", "No such file or directory"), (tmp_path, "Is a directory")):
        argv = [command, *COMMANDS[command]]
        argv[argv.index(option) + 1] = str(path)
        assert cli.main(argv) == 2
        assert f"error: {option} {path}: {says}" in capsys.readouterr().err


def test_a_questions_line_without_an_alias_is_named(tmp_path, capsys):
    """(an empty list of answers was the library's error, naming answers[0], not the file's line)"""
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"prompt": "a", "answers": ["b"]}\n{"prompt": "x", "answers": ["", " "]}\n')
    assert cli.main(["availability", "--model", "m", "--questions", str(questions)]) == 2
    assert f'error: {questions}:2: "answers" needs an alias that is not blank' in capsys.readouterr().err


def test_questions_judged_on_some_lines_only_are_refused(tmp_path):
    """"correct" is given on every line or on none: a file judging some questions only is refused,
    not read with None rows that by_correctness would count as neither."""
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"prompt": "a", "answers": "b", "correct": true}\n{"prompt": "c", "answers": "d"}\n')
    with pytest.raises(ValueError, match='give "correct" on every line or on none'):
        cli._read_questions(str(questions))
    questions.write_text('{"prompt": "a", "answers": "b", "correct": true}\n'
                         '{"prompt": "c", "answers": "d", "correct": false}\n')
    assert cli._read_questions(str(questions))[2] == [True, False]


def test_prune_takes_up_to_half_of_the_heads():
    """--prune prunes round(fraction x heads) top heads and as many random others: 0.5 of an even
    head count leaves just enough others (allowed, as "at most 4/8" says); more is refused, and of
    an odd count 0.5 rounds to more than half, which the message's bound (3/7, not 0.5) excludes."""
    cli._check_prune(0.5, 8)
    cli._check_prune(0.25, 8)
    with pytest.raises(ValueError, match="give a fraction of at most 4/8"):
        cli._check_prune(0.625, 8)
    cli._check_prune(3 / 7, 7)
    with pytest.raises(ValueError, match="give a fraction of at most 3/7"):
        cli._check_prune(0.5, 7)


def test_a_model_path_that_is_a_file_is_named_as_one(tmp_path, capsys):
    """(it said "no such checkpoint folder" of a file that exists)"""
    texts = tmp_path / "texts.txt"
    texts.write_text("a text\n")
    assert cli.main(["sinks", "--model", str(texts), "--texts", str(texts)]) == 2
    assert f"error: {texts} is a file: give the checkpoint's folder" in capsys.readouterr().err
    missing = tmp_path / "no_model"
    assert cli.main(["sinks", "--model", str(missing), "--texts", str(texts)]) == 2
    assert f"error: {missing}: no such checkpoint folder (fastprobe loads local checkpoints only)" in \
        capsys.readouterr().err


def test_the_demo_out_of_memory_says_which_sizes_in_one_line(capsys, monkeypatch):
    """(--vocab 100000000000 ended in the allocator's traceback); other errors are not hidden"""
    def allocate(device, args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(cli, "_demo_sections", allocate)
    assert cli.main(["demo", "--vocab", "100000000000"]) == 2
    assert "out of memory at --drafts 4 --tokens 256 --vocab 100000000000 --length 1024" in \
        _one_error_line(capsys, "demo")
    monkeypatch.setattr(cli, "_demo_sections", lambda device, args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        cli.main(["demo"])

    def kernel_failure(device, args):  # a RuntimeError that is not the allocator's: not an out of memory
        raise RuntimeError("a kernel failed")

    monkeypatch.setattr(cli, "_demo_sections", kernel_failure)
    with pytest.raises(RuntimeError, match="a kernel failed"):
        cli.main(["demo"])


def test_version_and_python_dash_m():
    import subprocess
    import sys

    import fastprobe

    for argv in (["-m", "fastprobe", "--version"], ["-m", "fastprobe.cli", "--version"]):
        done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and done.stdout.strip() == f"fastprobe {fastprobe.__version__}", done


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


def test_sinks_prune_shows_its_perplexity_passes_unless_no_progress(checkpoints, capsys):
    """The three perplexity passes of --prune show progress bars as the scoring pass does, and
    --no-progress switches all of them off (they had no bar, whatever the option said)."""
    folders, texts = checkpoints
    command = ["sinks", "--model", folders["target"], "--texts", texts, "--prune", "0.25"]
    assert cli.main(command) == 0
    assert capsys.readouterr().err.count("perplexity") >= 3
    assert cli.main([*command, "--no-progress"]) == 0
    assert capsys.readouterr().err == ""


def test_a_target_without_a_tokenizer_is_named(checkpoints, capsys):
    """(the error was transformers' alone, a few lines on converting slow tokenizers, no folder;
    then transformers' reason, which pointed at installing sentencepiece), on one line"""
    folders, texts = checkpoints
    assert cli.main(_uncertainty(folders, texts, "no_tokenizer", "draft")) == 2
    error = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(error) == 1 and f"error: {folders['no_tokenizer']}: the folder has no tokenizer files" in error[0]


@pytest.mark.parametrize("command", ["sinks", "uncertainty", "availability"])
def test_a_csv_path_that_is_a_folder_is_refused_before_any_model_loads(command, tmp_path, capsys):
    """(it was found when the table was written, after the whole run: "[Errno 21] Is a directory")"""
    assert cli.main([command, *COMMANDS[command], "--csv", str(tmp_path)]) == 2
    assert f"error: {tmp_path} is a folder" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["abc", "nan", "-0.1", "1.5"])
def test_a_bad_fraction_is_named(value, capsys):
    """(--prune abc said "invalid _fraction value: 'abc'")"""
    for argv in (["sinks", *COMMANDS["sinks"], "--prune", value], ["availability", *COMMANDS["availability"],
                                                                   "--threshold", value]):
        with pytest.raises(SystemExit):
            cli.main(argv)
        assert f"must be a fraction in [0, 1], got '{value}'" in capsys.readouterr().err


def _one_error_line(capsys, command: str) -> str:
    """The one line a refused command prints last on stderr (an exception it did not catch would
    have reached the test)."""
    lines = capsys.readouterr().err.splitlines()
    assert lines and lines[-1].startswith(f"fastprobe {command}: error: "), lines
    assert sum(line.startswith(f"fastprobe {command}: error: ") for line in lines) == 1
    return lines[-1]


@pytest.mark.parametrize("command", ["demo", "sinks", "uncertainty", "availability"])
def test_a_backend_that_cannot_run_is_refused_before_any_work(command, capsys, monkeypatch):
    """A bad FASTPROBE_BACKEND, or a forced backend that cannot run on the command's device, ends
    the command in one line (exit 2) before any work (both were tracebacks, the demo's and
    the methods' after loading); info shows the bad name in its table and exits 2."""
    import fastprobe

    ran = _stub_commands(monkeypatch)
    monkeypatch.setenv("FASTPROBE_BACKEND", "foo")
    assert cli.main([command, *COMMANDS[command]]) == 2 and not ran
    assert "FASTPROBE_BACKEND must be one of auto, reference, cpp, triton; got 'foo'" in _one_error_line(capsys, command)
    assert cli.main(["info"]) == 2
    printed = dict(line.split("  ", 1) for line in capsys.readouterr().out.splitlines())
    assert printed["backend in force"].strip().startswith("invalid: FASTPROBE_BACKEND must be one of")
    monkeypatch.delenv("FASTPROBE_BACKEND")
    if torch.cuda.is_available():
        return
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with fastprobe.use_backend("triton"):
        assert cli.main([command, *COMMANDS[command], "--device", "cpu"]) == 2 and not ran
    assert "backend 'triton' cannot run on cpu tensors" in _one_error_line(capsys, command)


@pytest.mark.parametrize("missing", ["transformers", "pandas"])
@pytest.mark.parametrize("command", ["demo", "sinks", "uncertainty", "availability"])
def test_a_missing_package_is_named_before_any_work(command, missing, capsys, monkeypatch):
    """Without transformers or pandas every command but info says which to install, in one line
    (the demo failed with a traceback after its op sections; --no-progress failed at once)."""
    import sys

    ran = _stub_commands(monkeypatch)
    monkeypatch.setitem(sys.modules, missing, None)  # (import fails)
    assert cli.main([command, *COMMANDS[command], "--no-progress"] if command != "demo" else ["demo"]) == 2
    assert not ran
    assert f"{command} needs {missing}: pip install {missing}" in _one_error_line(capsys, command)


@pytest.mark.parametrize("command", ["sinks", "uncertainty", "availability"])
def test_an_output_that_cannot_be_written_is_refused_before_any_model_loads(command, tmp_path, capsys):
    """(a path the command may not write was found when the table was written, after the whole
    run); checking leaves no file behind and an existing one as it was."""
    if not Path("/proc/self").is_dir():
        pytest.skip("needs /proc (Linux), where no file can be created")
    assert cli.main([command, *COMMANDS[command], "--csv", "/proc/fastprobe-table.csv"]) == 2
    assert "error: /proc/fastprobe-table.csv cannot be written" in _one_error_line(capsys, command)
    existing, new = tmp_path / "kept.csv", tmp_path / "new.csv"
    existing.write_text("kept")
    for path in (existing, new):  # (the command then stops at its missing input file)
        assert cli.main([command, *COMMANDS[command], "--csv", str(path)]) == 2
        assert "No such file or directory" in _one_error_line(capsys, command)
    assert existing.read_text() == "kept" and not new.exists()


@pytest.fixture(scope="module")
def broken_checkpoints(tmp_path_factory, checkpoints):
    """Folders that are not causal-LM checkpoints, or broken ones, each with the tiny tokenizer:
    name -> (folder, what the one-line error says)."""
    import json
    import shutil

    import transformers

    from fastprobe.models import tiny_tokenizer

    root, tokenizer = tmp_path_factory.mktemp("broken"), tiny_tokenizer()
    good = Path(checkpoints[0]["target"])
    cases = {}

    def copy(name: str) -> Path:
        shutil.copytree(good, root / name)
        return root / name

    (copy("corrupt_weights") / "model.safetensors").write_bytes(b"not a safetensors file" * 4)
    cases["corrupt_weights"] = "the checkpoint could not be loaded (SafetensorError"
    (copy("corrupt_config") / "config.json").write_text("{not json")
    cases["corrupt_config"] = "its config.json could not be read"
    config = json.loads((copy("other_sizes") / "config.json").read_text())
    (root / "other_sizes" / "config.json").write_text(json.dumps(config | {"hidden_size": 2 * config["hidden_size"]}))
    cases["other_sizes"] = "the checkpoint could not be loaded (RuntimeError"
    from safetensors.torch import load_file, save_file

    weights = load_file(good / "model.safetensors")
    del weights["model.norm.weight"]
    save_file(weights, copy("missing_weights") / "model.safetensors", metadata={"format": "pt"})
    cases["missing_weights"] = ("the checkpoint has no weights for 1 of LlamaForCausalLM's parameters (e.g. "
                                "model.norm.weight), which would be random")
    (copy("corrupt_tokenizer") / "tokenizer.json").write_text("{}")
    # (transformers' reason: 5.x a KeyError; 4.5x falls back to the slow tokenizer, which may need protobuf)
    cases["corrupt_tokenizer"] = "no tokenizer could be loaded from the checkpoint folder ("
    (root / "empty").mkdir()
    cases["empty"] = "no config.json there, so not a transformers checkpoint folder"
    bert = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, intermediate_size=64)
    t5 = transformers.T5Config(vocab_size=len(tokenizer), d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16)
    for name, model, says in [
        ("bert_masked_lm", transformers.BertForMaskedLM(bert), "its attention is bidirectional (BertLMHeadModel"),
        ("bert_encoder", transformers.BertModel(bert), "its attention is bidirectional (BertLMHeadModel"),
        ("t5", transformers.T5ForConditionalGeneration(t5), "holds a 't5' model, which transformers has no causal"),
    ]:
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        cases[name] = says
    return {name: (str(root / name), says) for name, says in cases.items()}


BROKEN = ["corrupt_weights", "corrupt_config", "other_sizes", "missing_weights", "corrupt_tokenizer", "empty",
          "bert_masked_lm", "bert_encoder", "t5"]


@pytest.mark.parametrize("name", BROKEN)
def test_a_folder_that_is_no_causal_lm_checkpoint_is_refused_in_one_line(name, broken_checkpoints, checkpoints,
                                                                          capsys):
    """Corrupt files, sizes other than the config's, an empty folder, an encoder (BERT: loaded as
    BertLMHeadModel it attended both ways, or ran with a random head) and an encoder-decoder:
    one line naming the folder, exit 2 (they were tracebacks, a 3,000-character list of
    transformers' classes, or silently scored)."""
    folder, says = broken_checkpoints[name]
    texts = checkpoints[1]
    assert cli.main(["sinks", "--model", folder, "--texts", texts, "--no-progress"]) == 2
    printed = capsys.readouterr()
    lines = printed.err.splitlines()
    assert lines and lines[-1].startswith("fastprobe sinks: error: ") and len(lines[-1]) < 600, lines
    assert f"error: {folder}" in lines[-1] and says in lines[-1]
    if name.startswith("bert"):  # (transformers' load report came first, ~20 lines)
        assert len(lines) == 1 and "LOAD REPORT" not in printed.out


def test_uncertainty_with_no_token_to_score_is_an_error(checkpoints, capsys):
    """(texts of one token each, after --max-length 1: the command printed empty tables and NaN means, exit 0)"""
    folders, texts = checkpoints
    assert cli.main([*_uncertainty(folders, texts, "target", "draft"), "--max-length", "1"]) == 2
    assert "no token to score: every text has fewer than two tokens" in _one_error_line(capsys, "uncertainty")


def test_input_files_with_a_byte_order_mark_or_other_line_breaks(tmp_path):
    """A UTF-8 byte order mark at the file's start (Windows tools write one) is not text (it was
    the first text's first character, or made line 1 of a questions file invalid JSON), and lines
    end at \\n, \\r\\n or \\r only: a form feed, U+2028 or U+0085 inside a text or a JSON string
    (json.dumps(..., ensure_ascii=False) writes them as they are) split it, and line numbers in
    errors counted those pieces."""
    import json

    texts = tmp_path / "texts.txt"
    texts.write_bytes("\ufeffFirst text\r\npage one\x0cpage two\u2028and on\r\n\r\nlast\u0085line\n".encode())
    assert cli._read_texts(str(texts)) == ["First text", "page one\x0cpage two\u2028and on", "last\u0085line"]
    questions = tmp_path / "questions.jsonl"
    lines = [json.dumps({"prompt": "Q: Paris\u2028or\u0085Rome? A:", "answers": ["Paris"]}, ensure_ascii=False),
             json.dumps({"prompt": "Q: Capital? A:", "answers": "Rome"})]
    questions.write_bytes(("\ufeff" + "\r\n".join(lines) + "\r\n").encode())
    prompts, answers, correct = cli._read_questions(str(questions))
    assert prompts == ["Q: Paris\u2028or\u0085Rome? A:", "Q: Capital? A:"] and answers == [["Paris"], "Rome"]
    assert correct is None
    questions.write_text(lines[0] + "\n" + '{"prompt": "x", "answers": ["a"],}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"questions\.jsonl:2: each line must be a JSON object"):
        cli._read_questions(str(questions))


def test_a_draft_whose_tokenizer_cannot_be_loaded_is_refused(tmp_path):
    """A draft folder with a truncated tokenizer.json (an interrupted copy) was taken on trust like
    a folder without a tokenizer (json's error is a ValueError, which meant 'no tokenizer'): it is
    refused by name; a folder without tokenizer files is still taken on trust."""
    from fastprobe.models import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(tmp_path / "corrupt")
    saved = tmp_path / "corrupt" / "tokenizer.json"
    saved.write_text(saved.read_text()[:100])
    # (json's JSONDecodeError; transformers 4.5x falls back to converting a slow tokenizer: an ImportError)
    refused = r"--drafts .*corrupt: its tokenizer could not be loaded \((JSONDecodeError|ImportError)"
    with pytest.raises(ValueError, match=refused):
        cli._check_draft_tokenizer(str(tmp_path / "corrupt"), tokenizer)
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.json").write_text("{}")
    assert cli._check_draft_tokenizer(str(tmp_path / "bare"), tokenizer) is None


def test_sinks_with_no_text_of_two_tokens_is_an_error(tmp_path, capsys):
    """Texts of one token each (a tokenizer that adds no BOS): every head scored 1.0 and the
    command exited 0, or with --prune printed that table, then failed; now one line before any work."""
    from tokenizers import processors

    from fastprobe.models import tiny_model, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    tokenizer.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)  # (no <s>)
    tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(tmp_path / "no_bos")
    tokenizer.save_pretrained(tmp_path / "no_bos")
    texts = tmp_path / "texts.txt"
    texts.write_text("a\nb\n")
    capsys.readouterr()  # (saving's bars)
    context = tiny_model("llama").config.max_position_embeddings  # (--max-length's default)
    for prune in ([], ["--prune", "0.25"]):
        assert cli.main(["sinks", "--model", str(tmp_path / "no_bos"), "--texts", str(texts), "--no-progress",
                         *prune]) == 2
        printed = capsys.readouterr()
        assert printed.out == "" and printed.err == ("fastprobe sinks: error: no token to predict: every text has fewer "
                                                     f"than two tokens (at most --max-length {context} each)\n")


def test_a_pgf_plot_without_tex_is_refused_before_any_model_loads(capsys, monkeypatch):
    """(matplotlib's pgf backend runs xelatex: without it the plot failed after the whole run, a traceback)"""
    pytest.importorskip("matplotlib")
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: None)  # (the command's texts, "t", are missing: not read)
    assert cli.main(["sinks", *COMMANDS["sinks"], "--plot", "heads.pgf"]) == 2
    assert "error: --plot heads.pgf: matplotlib writes pgf with" in _one_error_line(capsys, "sinks")


def test_a_csv_and_plot_of_one_file_are_refused_before_any_model_loads(tmp_path, capsys, monkeypatch):
    """(the table was written over the heat map, both reported as written)"""
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["sinks", *COMMANDS["sinks"], "--csv", "out.png", "--plot", f"{tmp_path}/out.png"]) == 2
    assert f"error: --csv out.png and --plot {tmp_path}/out.png are the same file" in _one_error_line(capsys, "sinks")
    assert not (tmp_path / "out.png").exists()


@pytest.mark.parametrize("command", ["sinks", "uncertainty", "availability"])
def test_an_output_over_an_input_is_refused_before_any_model_loads(command, tmp_path, capsys, monkeypatch):
    """(--csv naming the texts or questions file, or a file of a checkpoint folder, wrote the table
    over it at the run's end: the input or the checkpoint lost); a new file in the folder is fine"""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    arguments = COMMANDS[command]
    read = arguments[arguments.index("--texts" if "--texts" in arguments else "--questions") + 1]
    for output, option, where in [(read, arguments[arguments.index(read) - 1], "the file"),
                                  (f"{tmp_path}/m/config.json", "--target" if command == "uncertainty" else "--model",
                                   "a file in the folder")]:
        assert cli.main([command, *arguments, "--csv", output]) == 2
        assert f"error: --csv {output} would write over {where} of {option} " in _one_error_line(capsys, command)
    assert (tmp_path / "m" / "config.json").read_text() == "{}"
    assert cli.main([command, *arguments, "--csv", "m/table.csv"]) == 2  # (refused later: there is no text t)
    assert "would write over" not in capsys.readouterr().err


@pytest.mark.parametrize("command", ["demo", "sinks", "uncertainty", "availability"])
def test_a_cuda_device_past_the_ones_there_exits_with_usage(command, capsys, monkeypatch):
    """(--device cuda:5 on a machine with one GPU passed, then moving the model was a traceback:
    invalid device ordinal)"""
    ran = _stub_commands(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SystemExit) as raised:
        cli.main([command, *COMMANDS[command], "--device", "cuda:5"])
    assert raised.value.code == 2 and not ran
    assert "argument --device: cuda:5: this torch sees 1 CUDA device(s), cuda:0 to cuda:0" in capsys.readouterr().err


@pytest.mark.parametrize("device", ["meta", "mps"])
def test_a_device_fastprobe_does_not_run_on_exits_with_usage(device, capsys, monkeypatch):
    ran = _stub_commands(monkeypatch)
    with pytest.raises(SystemExit) as raised:
        cli.main(["sinks", *COMMANDS["sinks"], "--device", device])
    assert raised.value.code == 2 and not ran
    assert f"argument --device: {device}: fastprobe runs on cpu or cuda" in capsys.readouterr().err


def test_dtype_loads_the_checkpoint_in_that_dtype(checkpoints):
    folder = checkpoints[0]["target"]
    for dtype, want in (("auto", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        model = cli._load_model(folder, "cpu", dtype)
        assert {parameter.dtype for parameter in model.parameters()} == {want}, dtype


def test_sinks_without_prune_scores_the_heads_only(checkpoints, capsys):
    folders, texts = checkpoints
    assert cli.main(["sinks", "--model", folders["target"], "--texts", texts, "--top", "3", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "strongest sink heads of 8:" in printed and "perplexity" not in printed
    assert len([line for line in printed.splitlines() if line.split()[:1] in (["1"], ["2"], ["3"])]) == 3


@pytest.mark.parametrize("command", ["info", "uncertainty"])
def test_a_stdout_closed_early_ends_in_one_line(command, checkpoints):
    """(`fastprobe uncertainty ... | head`: info, uncertainty and availability printed a traceback,
    BrokenPipeError; sinks said it in one line)"""
    import os
    import subprocess
    import sys

    folders, texts = checkpoints
    argv = ["info"] if command == "info" else _uncertainty(folders, texts, "target", "draft")
    read, write = os.pipe()
    os.close(read)  # (a reader that went away)
    try:
        done = subprocess.run([sys.executable, "-m", "fastprobe", *argv], stdout=write, stderr=subprocess.PIPE,
                              text=True, timeout=300)
    finally:
        os.close(write)
    assert done.returncode == 2 and done.stderr == f"fastprobe {command}: error: [Errno 32] Broken pipe\n", done


def _nan_checkpoint(folder: str, tmp_path, weights: str) -> str:
    """A copy of the checkpoint `folder` whose weights with `weights` in their names are NaN."""
    import shutil

    from safetensors.torch import load_file, save_file

    copy = tmp_path / f"nan_{weights}"
    shutil.copytree(folder, copy)
    saved = load_file(copy / "model.safetensors")
    saved = {name: value.fill_(float("nan")) if weights in name else value for name, value in saved.items()}
    save_file(saved, copy / "model.safetensors", metadata={"format": "pt"})
    return str(copy)


@pytest.mark.parametrize("weights, says", [
    ("q_proj", "are not finite (the model's outputs overflow or are NaN there?)"),
    ("lm_head", "perplexity nan, nan with the top sink heads pruned, nan with random ones: not finite"),
])
def test_sinks_of_a_checkpoint_with_nan_weights_is_an_error_in_one_line(weights, says, checkpoints, tmp_path, capsys):
    """NaN sink scores (score_heads' FloatingPointError) were a traceback, NaN perplexities were
    printed with exit 0; uncertainty and availability said theirs in one line."""
    folders, texts = checkpoints
    model = _nan_checkpoint(folders["target"], tmp_path, weights)
    assert cli.main(["sinks", "--model", model, "--texts", texts, "--no-progress", "--prune", "0.25"]) == 2
    assert says in _one_error_line(capsys, "sinks")


def test_texts_past_a_rotary_checkpoints_positions_are_said_in_one_line(tmp_path, capsys):
    """A text longer than a rotary checkpoint's max_position_embeddings runs (as the model would)
    with a warning: on stderr one line naming the command and --max-length, as its errors read, not
    Python's file, line and source line; within the context there is none."""
    import warnings

    from fastprobe.models import DEMO_TEXTS, tiny_model, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    tiny_model("llama", vocab_size=len(tokenizer), max_position_embeddings=16).save_pretrained(tmp_path / "short")
    tokenizer.save_pretrained(tmp_path / "short")
    texts = tmp_path / "texts.txt"
    texts.write_text(" ".join(DEMO_TEXTS[:2]) + "\nStars\n")
    length = len(tokenizer(" ".join(DEMO_TEXTS[:2]))["input_ids"])
    assert length > 16
    for max_length, said in [(["--max-length", "512"], True), (["--max-length", "16"], False), ([], False)]:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            assert cli.main(["sinks", "--model", str(tmp_path / "short"), "--texts", str(texts), "--no-progress",
                             *max_length]) == 0
        err = capsys.readouterr().err
        line = (f"fastprobe sinks: warning: sink scores: texts of {length} tokens run past the 16 positions "
                "LlamaForCausalLM's config gives (max_position_embeddings)")
        assert (line in err) == said and "UserWarning" not in err and "cli.py" not in err, err


def test_max_length_defaults_to_the_checkpoints_context(tmp_path, capsys):
    """--max-length left out: each command truncates texts to the context the checkpoints' configs
    give (the fewest positions of target and drafts; availability's prompts leave room for the
    tokens generated after them), as its help says, not to 512: a checkpoint of 16 positions runs
    without the warning of texts past them, one of 1024 reads a text of more than 512 tokens whole."""
    import json
    import warnings

    from fastprobe.models import DEMO_TEXTS, tiny_model, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    for name, context in [("short", 16), ("long", 1024)]:
        tiny_model("llama", vocab_size=len(tokenizer), max_position_embeddings=context).save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    long_text = " ".join(DEMO_TEXTS * 2)
    length = len(tokenizer(long_text)["input_ids"])
    assert 512 < length <= 1024
    texts = tmp_path / "texts.txt"
    texts.write_text(long_text + "\n")
    questions = tmp_path / "questions.jsonl"
    questions.write_text(json.dumps({"prompt": long_text, "answers": ["river"]}) + "\n")
    capsys.readouterr()  # (saving's bars)
    commands = [["sinks", "--model", str(tmp_path / "short"), "--texts", str(texts)],
                ["uncertainty", "--target", str(tmp_path / "short"), "--drafts", str(tmp_path / "short"),
                 "--texts", str(texts)],
                ["availability", "--model", str(tmp_path / "short"), "--questions", str(questions)]]
    for command in commands:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            assert cli.main([*command, "--no-progress"]) == 0, command
        err = capsys.readouterr().err
        assert "run past" not in err and "friendly reminder" not in err, (command, err)
    assert cli.main(["uncertainty", "--target", str(tmp_path / "long"), "--drafts", str(tmp_path / "long"),
                     "--texts", str(texts), "--no-progress", "--csv", str(tmp_path / "tokens.csv")]) == 0
    pandas = pytest.importorskip("pandas")
    assert len(pandas.read_csv(tmp_path / "tokens.csv")) == length - 1  # every token after the first scored
    for command in ("sinks", "uncertainty", "availability"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        assert "default: the models' context" in " ".join(capsys.readouterr().out.split())
