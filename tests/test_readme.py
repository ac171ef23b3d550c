"""The README's examples run as written, the signatures and command options it writes out are the
code's, and every public name and command option says what it is (help() and --help)."""

import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest

pytest.importorskip("transformers")

README = Path(__file__).resolve().parents[1] / "README.md"


def python_block_after(heading: str) -> str:
    text = README.read_text()
    start = text.index(heading)
    opening = text.index("```python\n", start) + len("```python\n")
    return text[opening:text.index("```", opening)]


@pytest.mark.usefixtures("one_thread")
def test_quick_start_runs_and_its_shapes_are_as_commented():
    names: dict = {}
    exec(compile(python_block_after("## Quick start"), "README quick start", "exec"), names)
    assert names["u"].epistemic.shape == (256,)
    assert names["c"].mass.shape == (2, 2)
    assert names["a"].sink_mass.shape == (1, 8, 2048)
    assert names["record"].sink_mass.shape == (2, 4)


def readme_arguments(call: str) -> str:
    """The argument list written after the README's first inline `call(` (it may span lines)."""
    text = " ".join(README.read_text().split())
    start = text.index(f"`{call}(") + len(call) + 2
    depth, end = 1, start
    while depth:
        depth += {"(": 1, ")": -1}.get(text[end], 0)
        end += 1
    return text[start:end - 1]


PLACEHOLDER = object()  # `x=...`: the README names the argument, not its value


def readme_default(node: ast.expr):
    """`a | b | c` lists the choices, the default first (`mode="mask" | "zero_o_proj"`)."""
    while isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        node = node.left
    value = ast.literal_eval(node)
    return PLACEHOLDER if value is Ellipsis or (isinstance(value, list) and Ellipsis in value) else value


def readme_parameters(call: str) -> list:
    """(name, kind, default) for each parameter the README writes for `call`; kind as inspect's."""
    arguments = ast.parse(f"def f({readme_arguments(call)}): pass").body[0].args
    positional = arguments.args
    defaults = [inspect.Parameter.empty] * (len(positional) - len(arguments.defaults)) + arguments.defaults
    parameters = [(a.arg, inspect.Parameter.POSITIONAL_OR_KEYWORD, d) for a, d in zip(positional, defaults)]
    parameters += [(a.arg, inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.empty if d is None else d)
                   for a, d in zip(arguments.kwonlyargs, arguments.kw_defaults)]
    if arguments.kwarg is not None:
        parameters.append((arguments.kwarg.arg, inspect.Parameter.VAR_KEYWORD, inspect.Parameter.empty))
    return [(name, kind, readme_default(default) if isinstance(default, ast.expr) else default)
            for name, kind, default in parameters]


def resolve(path: str):
    """`fastprobe.methods.sinks.prune_heads` -> the function (attributes after the module)."""
    parts = path.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attribute in parts[split:]:
            obj = getattr(obj, attribute)
        return obj
    raise ImportError(path)


# The README's API section writes these signatures out in full: names, order, `*`, defaults.
COMPLETE = {
    "fp.draft_divergence": "fastprobe.draft_divergence",
    "fp.draft_divergence_sharded": "fastprobe.draft_divergence_sharded",
    "fp.ConceptSet": "fastprobe.ConceptSet",
    "fp.ConceptSet.from_ids": "fastprobe.ConceptSet.from_ids",
    "fp.ConceptSet.from_answers": "fastprobe.ConceptSet.from_answers",
    "fp.concept_mass": "fastprobe.concept_mass",
    "fp.bridge_loss": "fastprobe.bridge_loss",
    "fp.beta_schedule": "fastprobe.beta_schedule",
    "fp.sink_attention": "fastprobe.sink_attention",
    "fp.dual_path_attention": "fastprobe.dual_path_attention",
    "fp.patch": "fastprobe.patch",
    "fp.unpatch": "fastprobe.unpatch",
    "fastprobe.integrations.update_patch": "fastprobe.integrations.update_patch",
}

# The method layer's are shortened: the parameters written are the function's (positional ones in
# their place), with the function's defaults; the rest are left out.
SHORTENED = {
    "distillation_loss": "fastprobe.methods.distillation.distillation_loss",
    "trainer_compute_loss": "fastprobe.methods.distillation.trainer_compute_loss",
    "prune_heads": "fastprobe.methods.sinks.prune_heads",
    "guided_generate": "fastprobe.methods.guidance.guided_generate",
    "token_uncertainty": "fastprobe.methods.uncertainty.token_uncertainty",
    "sequence_scores": "fastprobe.methods.uncertainty.sequence_scores",
    "auroc": "fastprobe.methods.uncertainty.auroc",
    "answer_availability": "fastprobe.methods.availability.answer_availability",
    "by_correctness": "fastprobe.methods.availability.by_correctness",
    "soft_prompt_generate": "fastprobe.methods.soft_prompts.soft_prompt_generate",
    "shift_vectors": "fastprobe.methods.nullspace.shift_vectors",
    "bias_subspace": "fastprobe.methods.nullspace.bias_subspace",
    "project_out": "fastprobe.methods.nullspace.project_out",
    "collect_hidden_states": "fastprobe.methods.probes.collect_hidden_states",
    "train_probe": "fastprobe.methods.probes.train_probe",
    "fp.record_attention": "fastprobe.record_attention",
}


def code_parameters(path: str) -> list:
    return [(p.name, p.kind, p.default) for p in inspect.signature(resolve(path)).parameters.values()]


@pytest.mark.parametrize("call", sorted(COMPLETE))
def test_the_api_sections_signatures_are_the_codes(call):
    assert readme_parameters(call) == code_parameters(COMPLETE[call])


@pytest.mark.parametrize("call", sorted(SHORTENED))
def test_the_method_layers_shortened_signatures_name_real_parameters(call):
    code = {name: (kind, default) for name, kind, default in code_parameters(SHORTENED[call])}
    code_order = list(code)
    takes_any_keyword = any(kind == inspect.Parameter.VAR_KEYWORD for kind, _ in code.values())
    for position, (name, kind, default) in enumerate(readme_parameters(call)):
        if default is inspect.Parameter.empty:  # written positionally: that parameter, in that place
            assert code_order[position] == name, f"{call}: argument {position} is {code_order[position]}, not {name}"
            continue
        assert name in code or takes_any_keyword, f"{call} has no parameter {name}"
        if name in code and default is not PLACEHOLDER:
            assert code[name][1] == default, f"{call}: {name} defaults to {code[name][1]!r}, not {default!r}"


@pytest.mark.parametrize("command", ["sinks", "uncertainty", "availability"])
def test_the_command_lines_options_exist(command, capsys):
    from fastprobe import cli

    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    usage = capsys.readouterr().out
    written = re.search(rf"`fastprobe {command} ([^`]*)`", README.read_text().replace("\n", " "))
    options = set(re.findall(r"--[a-z][a-z-]*", written.group(1))) | {"--csv"}  # "each command's `--csv`"
    assert {option for option in options if option not in usage} == set()


PUBLIC_MODULES = ["fastprobe", "fastprobe.integrations", "fastprobe.models", "fastprobe.ops.attention"] + [
    f"fastprobe.methods.{name}" for name in
    ("sinks", "guidance", "distillation", "uncertainty", "availability", "soft_prompts", "nullspace", "probes")]


def public_objects():
    """(name, object) for every public function and class of PUBLIC_MODULES' __all__, and the public
    methods and properties that those classes define themselves (forward included)."""
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            value = getattr(module, name)
            if not (inspect.isfunction(value) or inspect.isclass(value)):
                continue
            yield f"{module_name}.{name}", value
            if inspect.isclass(value):
                for attribute, member in vars(value).items():
                    if (attribute.startswith("_") and attribute != "forward") or attribute in getattr(value, "_fields", ()):
                        continue
                    if isinstance(member, property) or inspect.isfunction(member):
                        yield f"{module_name}.{name}.{attribute}", member


def test_every_public_name_has_its_own_docstring():
    """help() on a public function, class, method or property says something of its own (not
    nn.Module.forward's "Define the computation performed at every call"). AttentionRecord's
    fields, is_patched, PrunedHeads.restore, the loss modules' forward had none."""
    from torch.nn import Module

    generic = {Module.forward.__doc__}
    missing = [name for name, value in public_objects()
               if not (value.__doc__ or "").strip() or value.__doc__ in generic]
    assert missing == []


@pytest.mark.parametrize("command", ["demo", "sinks", "uncertainty", "availability"])
def test_every_command_option_has_help(command, monkeypatch):
    """Every option of every command says what it is in --help (--batch-size and --dtype said
    nothing)."""
    import argparse

    from fastprobe import cli

    parsers = {}
    original = argparse._SubParsersAction.add_parser

    def add_parser(self, name, **options):
        parsers[name] = original(self, name, **options)
        return parsers[name]

    monkeypatch.setattr(argparse._SubParsersAction, "add_parser", add_parser)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", lambda self, argv=None: (_ for _ in ()).throw(SystemExit(0)))
    with pytest.raises(SystemExit):
        cli.main([command])
    silent = [action.option_strings[0] for action in parsers[command]._actions
              if action.option_strings and action.help in (None, "") and action.dest != "help"]
    assert silent == []


RESULTS = README.parent / "bench" / "results"


def readme_results_table() -> str:
    """The README's results table and the list of runs under it, as bench/report.py prints them."""
    text = README.read_text()
    start = text.index("| op | device |")
    return text[start:text.index("\n\nThe H200 rows come from", start)].strip()


def test_the_results_table_is_what_report_py_makes_of_bench_results(capsys):
    """`python bench/report.py bench/results/*.json` makes the README's table, as it says."""
    from bench import report

    report.main(sorted(str(path) for path in RESULTS.glob("*.json")))
    assert readme_results_table() == capsys.readouterr().out.strip()


def test_the_results_section_counts_the_cpu_runs_under_the_table():
    """"with the N commands listed under the table": one for each CPU run the table shows (it said
    five after a run had been replaced, with four listed)."""
    listed = re.findall(r"^- `cpu-[^`]*\.json`", readme_results_table(), flags=re.M)
    text = " ".join(README.read_text().split())
    written = re.search(r"CI kind of machine, with the (\w+) commands listed under the table", text)[1]
    assert written == ["zero", "one", "two", "three", "four", "five", "six", "seven"][len(listed)]


def json_ratio(name: str, group: str, impl: str, peer: str, paired: bool) -> float:
    """impl's speed over peer's in one run of bench/results: paired (median of the blocks' ratios)
    or from the two separate medians."""
    import json

    rows = {bench["extra_info"]["impl"]: bench for bench in json.loads((RESULTS / name).read_text())["benchmarks"]
            if bench["group"] == group}
    if paired:
        return rows[impl]["extra_info"]["paired"][peer]["speedup"]
    return rows[peer]["stats"]["median"] / rows[impl]["stats"]["median"]


@pytest.mark.parametrize("phrase, name, group, impl, peer, paired", [
    # the 16-dim heads' row, in the paragraph on the two columns (it gave the tiles' run's and the
    # table's run's separate medians as equal to their paired ratios; they read 1.70x and 1.62x)
    (r"the tiles' run: ([\d.]+)x paired", "cpu-attention-2026-12-06-zen4-tiles.json", "sink_attention_narrow-cpu",
     "fastprobe-narrow", "sdpa-narrow", True),
    (r"the tiles' run: [\d.]+x paired, ([\d.]+)x separately", "cpu-attention-2026-12-06-zen4-tiles.json",
     "sink_attention_narrow-cpu", "fastprobe-narrow", "sdpa-narrow", False),
    (r"the table's: ([\d.]+)x paired", "cpu-attention-2026-12-06-zen4-narrowpairs.json", "sink_attention_narrow-cpu",
     "fastprobe-narrow", "sdpa-narrow", True),
    (r"the table's: [\d.]+x paired, ([\d.]+)x separately", "cpu-attention-2026-12-06-zen4-narrowpairs.json",
     "sink_attention_narrow-cpu", "fastprobe-narrow", "sdpa-narrow", False),
    (r"the prefill pair scores' run: ([\d.]+)x paired", "cpu-attention-2026-12-06-zen4-bf16pairs.json",
     "sink_attention_narrow-cpu", "fastprobe-narrow", "sdpa-narrow", True),
    (r"the prefill pair scores' run: [\d.]+x paired, ([\d.]+)x separately",
     "cpu-attention-2026-12-06-zen4-bf16pairs.json", "sink_attention_narrow-cpu", "fastprobe-narrow", "sdpa-narrow",
     False),
    # the float32 prefill against eager attention with weights, among the paired figures
    (r"([\d.]+)x eager attention with weights \(paired", "cpu-attention-2026-12-06-zen4-narrowpairs.json",
     "sink_attention-cpu", "fastprobe", "eager-weights", True),
    (r"eager attention with weights \(paired; ([\d.]+)x by the separate medians",
     "cpu-attention-2026-12-06-zen4-narrowpairs.json", "sink_attention-cpu", "fastprobe", "eager-weights", False),
])
def test_the_results_prose_quotes_its_runs(phrase, name, group, impl, peer, paired):
    text = " ".join(README.read_text().split())
    found = re.search(phrase, text)
    assert found, f"README no longer says {phrase!r}"
    assert float(found[1]) == round(json_ratio(name, group, impl, peer, paired), 2)
