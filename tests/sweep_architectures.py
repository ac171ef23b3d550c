"""Patch every causal-LM family of the installed transformers that has the attention interface,
each in its own process (a family's default vision tower or bad small config must not stop the
rest), and print one line per family: logits vs unpatched on unpadded, left- and mixed-padded
batches (max abs difference), greedy tokens, recorded sink mass vs eager weights, or why it was
refused or could not be built. Not a test (minutes per family set); tests/test_architectures.py
keeps the families that matter. Run it against a new transformers release:

    python -m tests.sweep_architectures                 # every family, about 30 minutes on 2 cores
    python -m tests.sweep_architectures gpt_neox phi3   # some

A row's "could not build", "ref fails" or "eager fails" means transformers' own model fails on the
small config (not fastprobe); "FAILED" is an error in a run of the patched model (or a refusal
there: Dory's looped KV); eager
weights of families with learned sinks (gpt-oss style) may leave the sink out of the softmax they
return, so their "rec" differs by design.
"""

import subprocess
import sys

FAMILY_TIMEOUT_S = 120


def families() -> list:
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from fastprobe.integrations._lookups import _HYBRID_FAMILIES

    return [name for name, cls in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()
            if getattr(getattr(transformers, cls, None), "_supports_attention_backend", False)
            or name in _HYBRID_FAMILIES]


def check(model_type: str) -> str:
    import torch

    import fastprobe as fp

    from .test_architectures import build
    from .test_integration import eager_sink_mass, inputs, outputs

    torch.set_num_threads(1)
    try:
        reference, eager, model = (build(model_type, {}), build(model_type, {}, attn_implementation="eager"),
                                   build(model_type, {}))
    except Exception as error:  # transformers' own model on this config
        return "could not build: " + _first_line(error)
    try:
        fp.patch(model)
    except NotImplementedError as why:
        return "refused: " + str(why).split("\n")[0][:160]
    found = []
    for padding in ("none", "left", "mixed"):
        ids, mask = inputs(padding=padding)
        try:
            want = outputs(reference, ids, mask)
        except Exception as error:  # transformers' own model on this config
            found.append(f"{padding}: ref fails ({type(error).__name__})")
            continue
        real = mask.bool()
        found.append(f"{padding} {(outputs(model, ids, mask)[real] - want[real]).abs().max().item():.1e}")
    ids, mask = inputs(padding="left")
    settings = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        try:
            want_tokens = reference.generate(ids, **settings)
        except Exception as error:  # transformers' own generate on this config
            found.append(f"tokens: ref fails ({type(error).__name__})")
        else:
            found.append("tokens " + ("same" if torch.equal(want_tokens, model.generate(ids, **settings)) else "DIFFER"))
        ids, mask = inputs(padding="mixed")
        try:  # (MiniMax and HRM return weights of other shapes than the layers' keys)
            want_mass = eager_sink_mass(eager(input_ids=ids, attention_mask=mask, output_attentions=True).attentions, mask)
        except Exception as error:  # transformers' eager weights on this config
            found.append(f"rec: eager fails ({type(error).__name__})")
            return "; ".join(found)
        with fp.record_attention(model) as record:
            model(input_ids=ids, attention_mask=mask)
    found.append(f"rec {(record.sink_mass - want_mass).abs().max().item():.1e}")
    return "; ".join(found)


def _first_line(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0][:140] if str(error) else ''}"


def main(names: list) -> None:
    for name in names or families():
        try:
            run = subprocess.run([sys.executable, "-m", "tests.sweep_architectures", "--one", name],
                                 capture_output=True, text=True, timeout=FAMILY_TIMEOUT_S)
            lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
            result = lines[-1][len("RESULT "):] if lines else f"crashed (exit {run.returncode}{', killed: out of memory?' if run.returncode == -9 else ''}): " + (
                run.stderr.strip().splitlines() or ["?"])[-1][:160]
        except subprocess.TimeoutExpired:
            result = f"timed out after {FAMILY_TIMEOUT_S} s (a large default sub-model?)"
        print(f"{name:28s} {result}", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:
        try:
            print("RESULT " + check(sys.argv[2]), flush=True)
        except Exception as error:
            print("RESULT FAILED in a patched run: " + _first_line(error))
    else:
        main(sys.argv[1:])
