"""Paired CPU timing of two builds of fastprobe: each arm is a Python that imports one build (a
venv with another checkout installed, e.g. the commit before a kernel change), run one process
per repeat, the arms alternating (old, new, then new, old, ...) so that drift and other work on
the machine fall on both alike. Each process times every case (the median of its inner calls
after one warm-up) on 2 threads; printed are the medians over the processes, their quartiles,
old / new of those medians (above 1: the new build is faster), the median and quartiles of the
repeats' own old / new ratios (each repeat's two processes ran back to back: the steadier figure
when the machine's speed changes between repeats) and, for context, torch's SDPA (attention
cases, timed in the new build's first three processes).

    python bench/paired_cpu.py --old OLD_PYTHON --new NEW_PYTHON [--repeats 9] [--cases a,b]

(session 52: --old a venv at bee709a, --new this checkout's, for the 16-lane attention and the
second-order draft_divergence sums)
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

# name: ("sink" | "dual", dtype, B, Hq, Hkv, Lq, Lk, D, inner calls)
ATTENTION = {
    "prefill_f32_d64": ("sink", "float32", 1, 8, 8, 2048, 2048, 64, 2),
    "prefill_f32_d128": ("sink", "float32", 1, 8, 8, 2048, 2048, 128, 2),
    "prefill_bf16_d64": ("sink", "bfloat16", 1, 8, 8, 2048, 2048, 64, 2),
    "prefill_bf16_d128": ("sink", "bfloat16", 1, 8, 8, 2048, 2048, 128, 2),
    "decode_f32_mha": ("sink", "float32", 1, 32, 32, 1, 4096, 128, 20),
    "decode_f32_gqa4": ("sink", "float32", 1, 32, 8, 1, 4096, 128, 20),
    "decode_bf16_mha": ("sink", "bfloat16", 1, 32, 32, 1, 4096, 128, 20),
    "decode_bf16_gqa4": ("sink", "bfloat16", 1, 32, 8, 1, 4096, 128, 20),
    "decode_bf16_mha_d64": ("sink", "bfloat16", 1, 32, 32, 1, 4096, 64, 20),
    "decode_bf16_gqa4_d64": ("sink", "bfloat16", 1, 32, 8, 1, 4096, 64, 20),
    "dual_f32_d128": ("dual", "float32", 1, 8, 8, 2048, 2048, 128, 2),  # a 1000-key image dropped
    "dual_bf16_d128": ("dual", "bfloat16", 1, 8, 8, 2048, 2048, 128, 2),
}
# name: (dtype, K, N, V, inner calls), with a target
DIVERGENCE = {
    "divergence_f32": ("float32", 4, 256, 32000, 5),
    "divergence_bf16": ("bfloat16", 4, 256, 32000, 5),
    "divergence_step_f32": ("float32", 4, 1, 151936, 20),
}
# name: (op, dtype, N, V, inner calls): concept_mass over 1000 concepts of 8 variants, and the
# gradient of a sum of its log_mass; bridge_loss at beta = 0.5, forward and backward, each direction
VOCABULARY = {
    "concepts_f32": ("concepts", "float32", 512, 151936, 5),
    "concepts_grad_f32": ("concepts_grad", "float32", 512, 151936, 3),
    "bridge_f32": ("bridge", "float32", 2048, 32000, 2),
    "bridge_reverse_f32": ("bridge_reverse", "float32", 2048, 32000, 2),
}
CASES = {**ATTENTION, **DIVERGENCE, **VOCABULARY}


def _attention_calls(name, sdpa):
    import torch

    import fastprobe

    kind, dtype, batch, heads, kv_heads, queries, keys, dim, _ = ATTENTION[name]
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, h, n, dim, generator=generator).to(getattr(torch, dtype))
               for h, n in ((heads, queries), (kv_heads, keys), (kv_heads, keys)))
    if kind == "sink":
        calls = {name: lambda: fastprobe.sink_attention(q, k, v, causal=True)}
    else:
        drop = torch.zeros(batch, keys, dtype=torch.bool)
        drop[:, 100:1100] = True
        calls = {name: lambda: fastprobe.dual_path_attention(q, k, v, drop, gamma=1.5, causal=True)}
    if sdpa:
        k_all, v_all = (x.repeat_interleave(heads // kv_heads, 1) for x in (k, v))
        calls["sdpa:" + name] = lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k_all, v_all, is_causal=queries > 1)
    return calls


def _divergence_calls(name):
    import torch

    import fastprobe

    dtype, drafts, tokens, vocab, _ = DIVERGENCE[name]
    generator = torch.Generator().manual_seed(0)
    draft = (3 * torch.randn(drafts, tokens, vocab, generator=generator)).to(getattr(torch, dtype))
    target = (3 * torch.randn(tokens, vocab, generator=generator)).to(getattr(torch, dtype))
    return {name: lambda: fastprobe.draft_divergence(draft, target)}


def _vocabulary_calls(name):
    import torch

    import fastprobe

    op, dtype, tokens, vocab, _ = VOCABULARY[name]
    generator = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(tokens, vocab, generator=generator)).to(getattr(torch, dtype))
    if op.startswith("concepts"):
        ids = torch.randint(0, vocab, (1000, 8), generator=generator).tolist()
        concepts = fastprobe.ConceptSet.from_ids([list(dict.fromkeys(row)) for row in ids])
        if op == "concepts":
            return {name: lambda: fastprobe.concept_mass(logits, concepts)}
        leaf = logits.requires_grad_()
        return {name: lambda: torch.autograd.grad(fastprobe.concept_mass(leaf, concepts).log_mass.sum(), leaf)}
    teacher = (3 * torch.randn(tokens, vocab, generator=generator)).to(getattr(torch, dtype))
    student = logits.requires_grad_()
    direction = "reverse" if op == "bridge_reverse" else "forward"
    return {name: lambda: torch.autograd.grad(
        fastprobe.bridge_loss(student, teacher, beta=0.5, direction=direction), student)}


def worker(names, sdpa):
    """One process: every case's median call time (ms) as one line of JSON."""
    import torch

    torch.set_num_threads(2)
    times = {}
    for name in names:
        inner = CASES[name][-1]
        calls = (_attention_calls(name, sdpa) if name in ATTENTION else
                 _divergence_calls(name) if name in DIVERGENCE else _vocabulary_calls(name))
        for key, call in calls.items():
            call()  # warm-up
            spans = []
            for _ in range(inner):
                start = time.perf_counter()
                call()
                spans.append(time.perf_counter() - start)
            times[key] = statistics.median(spans) * 1e3
    print(json.dumps(times))


def quartiles(values):
    """(first quartile, median, third quartile); one value is all three (statistics.quantiles
    needs two)."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    low, _, high = statistics.quantiles(sorted(values), n=4, method="inclusive")
    return low, statistics.median(values), high


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="the Python of the old build")
    parser.add_argument("--new", required=True, help="the Python of the new build")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be 1 or more, got {args.repeats}")
    names = args.cases.split(",")
    unknown = [name for name in names if name not in CASES]
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {', '.join(CASES)}")
    results = {"old": [], "new": []}
    for repeat in range(args.repeats):
        for arm in ("old", "new") if repeat % 2 == 0 else ("new", "old"):
            sdpa = arm == "new" and repeat < 3
            command = [getattr(args, arm), __file__, "--worker", ",".join(names), str(int(sdpa))]
            run = subprocess.run(command, capture_output=True, text=True, cwd="/")  # (not a checkout's root)
            if run.returncode:
                sys.exit(f"{arm} arm failed:\n{run.stderr}")
            results[arm].append(json.loads(run.stdout.strip().splitlines()[-1]))
        print(f"repeat {repeat + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    print(f"{'case':22s} {'old ms (q1-q3)':>24s} {'new ms (q1-q3)':>24s} {'old/new':>8s} "
          f"{'per repeat (q1-q3)':>20s} {'SDPA ms':>9s}")
    for name in names:
        old_times = [times[name] for times in results["old"]]
        new_times = [times[name] for times in results["new"]]
        old, new = quartiles(old_times), quartiles(new_times)
        ratio = quartiles([o / n for o, n in zip(old_times, new_times)])  # repeat by repeat
        sdpa = [times["sdpa:" + name] for times in results["new"] if "sdpa:" + name in times]
        print(f"{name:22s} {old[1]:8.2f} ({old[0]:6.2f}-{old[2]:6.2f}) {new[1]:8.2f} ({new[0]:6.2f}-{new[2]:6.2f}) "
              f"{old[1] / new[1]:7.2f}x {ratio[1]:7.2f}x ({ratio[0]:4.2f}-{ratio[2]:4.2f}) "
              f"{statistics.median(sdpa) if sdpa else float('nan'):9.2f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2].split(","), sys.argv[3] == "1")
    else:
        main()
