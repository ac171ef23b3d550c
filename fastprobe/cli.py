"""The fastprobe command.

    fastprobe info     version, backends (and why one is unavailable), threads, versions
    fastprobe demo     runs the fused operations (draft_divergence, concept_mass, bridge_loss) on
                       a small built-in problem, checks them against the float64 reference and
                       prints a timing table per operation; then the sink-head pipeline on a small
                       built-in model (random weights with planted sink heads), and contrastive
                       guidance on a tiny built-in vision-language model (LLaVA, random weights),
                       draft uncertainty and answer availability on the built-in model
    fastprobe sinks    scores every head of a local transformers checkpoint by its attention on
                       the first token, prunes the top sink heads and reports perplexity
    fastprobe uncertainty   per-token draft uncertainty of texts: a target checkpoint and drafts
    fastprobe availability  the gold answer's mass at the commitment step, correct vs incorrect
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import itertools
import math
import os
import shutil
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from . import __version__, reference
from .backend import cpp_status, get_backend, resolve, triton_status
from .methods._batching import FALLBACK_MAX_LENGTH, default_max_length
from .ops._common import INT64_MAX, check_temperature
from .ops.bridge import bridge_loss
from .ops.concepts import ConceptSet, concept_mass
from .ops.divergence import draft_divergence


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _availability(status: tuple[bool, str]) -> str:
    available, why = status
    return ("available: " if available else "unavailable: ") + why


def info() -> int:
    try:
        backend, valid = get_backend(), True
    except ValueError as error:  # (a bad FASTPROBE_BACKEND: info still shows the rest, and exits 2)
        backend, valid = f"invalid: {error}", False
    rows = [
        ("fastprobe", __version__),
        ("backend in force", backend),
        ("cpp (CPU)", _availability(cpp_status())),
        ("triton (CUDA)", _availability(triton_status("cuda"))),
        ("triton (CPU interpreter)", _availability(triton_status("cpu"))),
        ("CPU threads", str(torch.get_num_threads())),
        ("torch", torch.__version__),
        ("triton", _version("triton")),
        ("transformers", _version("transformers")),
        ("pandas (method tables)", _version("pandas")),
        ("matplotlib (plots)", _version("matplotlib")),
        ("python", sys.version.split()[0]),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0 if valid else 2


def _median_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()  # warm-up: compilation, autotuning, first-touch allocation
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _worst_relative_error(fused: dict, exact: dict) -> float:
    """max over fields of max |fused - exact| / max(max |exact|, 1) (exact: float64 on the CPU):
    relative to a field's largest value, absolute for a field whose values are all below 1 (a
    log_mass near 0, where every concept holds nearly all the mass of a tiny vocabulary, would
    otherwise turn float32 rounding into a huge "relative" error)."""
    worst = 0.0
    for field, value in fused.items():
        error = (value.cpu().double() - exact[field]).abs().max().item()
        worst = max(worst, error / max(exact[field].abs().max().item(), 1.0))
    return worst


def _timing_table(inputs: torch.Tensor, fused_s: float, peer: str, peer_s: float) -> None:
    """fastprobe (with the backend that ran) against the peer, median ms and speed-up."""
    backend = resolve(inputs.device, inputs.dtype, "demo")
    print(f"  {'implementation':<42}{'median ms':>10}{'speed-up':>10}")
    print(f"  {'fastprobe (' + backend + ' backend)':<42}{fused_s * 1e3:>10.2f}{peer_s / fused_s:>9.1f}x")
    print(f"  {peer:<42}{peer_s * 1e3:>10.2f}{1.0:>9.1f}x")


def _draft_problem(num_drafts: int, num_tokens: int, vocab: int, device: torch.device, seed: int):
    """Logits that behave like related models: a shared 'consensus' plus per-model
    noise whose size varies by token, so some tokens are contested and some agreed."""
    generator = torch.Generator().manual_seed(seed)
    consensus = 4 * torch.randn(num_tokens, vocab, generator=generator)
    disagreement = 3 * torch.rand(num_tokens, 1, generator=generator) ** 2
    drafts = consensus + disagreement * torch.randn(num_drafts, num_tokens, vocab, generator=generator)
    target = consensus + 0.5 * torch.randn(num_tokens, vocab, generator=generator)
    return drafts.to(device), target.to(device)


def _demo_divergence(device: torch.device, num_drafts: int, num_tokens: int, vocab: int, seed: int) -> bool:
    drafts, target = _draft_problem(num_drafts, num_tokens, vocab, device, seed)
    print(f"draft_divergence: K={num_drafts} drafts, N={num_tokens} tokens, V={vocab}, float32 on {device}")
    fused = draft_divergence(drafts, target)
    exact = reference.draft_divergence(drafts.cpu().double(), target.cpu().double())
    worst = _worst_relative_error(
        {field: getattr(fused, field) for field in ("jsd", "kl_mixture_target", "epistemic", "mixture_entropy",
                                                    "draft_entropy")}, exact)
    ok = worst < 1e-4
    print(f"  check vs float64 reference: max relative error {worst:.2e} -> {'OK' if ok else 'FAILED'}")
    order = torch.argsort(fused.epistemic.cpu(), descending=True)
    print("  most uncertain tokens (position: epistemic = jsd + kl):")
    for position in order[:3].tolist():
        print(f"    {position:5d}: {fused.epistemic[position]:.4f} = {fused.jsd[position]:.4f} "
              f"+ {fused.kl_mixture_target[position]:.4f}")

    fused_s = _median_seconds(lambda: draft_divergence(drafts, target), device, repeats=5)
    eager_s = _median_seconds(lambda: reference.draft_divergence(drafts, target), device, repeats=3)
    _timing_table(drafts, fused_s, "eager PyTorch (softmax, mixture, logs)", eager_s)
    return ok


def _concept_problem(num_tokens: int, vocab: int, num_concepts: int, variants: int, device: torch.device, seed: int):
    """Background logits plus, at a third of the positions, one concept made likely: at
    some on one surface form (a confident answer), at others spread over its forms."""
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, vocab, (num_concepts, 4 * variants), generator=generator)
    concepts = ConceptSet.from_ids([list(dict.fromkeys(row.tolist()))[:variants] for row in draws])
    logits = 2 * torch.randn(num_tokens, vocab, generator=generator)
    for position in range(0, num_tokens, 3):
        ids = torch.tensor(concepts.variant_ids(int(torch.randint(num_concepts, (), generator=generator))))
        if position % 2 == 0:
            logits[position, ids[0]] += 14.0  # concentrated on one form
        else:
            logits[position, ids] += 11.0  # dispersed over the forms
    return logits.to(device), concepts.to(device)


def _demo_concepts(device: torch.device, num_tokens: int, vocab: int, num_concepts: int, seed: int) -> bool:
    variants = 8
    logits, concepts = _concept_problem(num_tokens, vocab, num_concepts, variants, device, seed)
    print(f"concept_mass: N={num_tokens} tokens, V={vocab}, C={num_concepts} concepts of <= {variants} variants, "
          f"float32 on {device}")
    fused = concept_mass(logits, concepts)
    exact = reference.concept_mass(logits.cpu().double(), concepts.token_ids.cpu(), concepts.offsets.cpu())
    worst = _worst_relative_error(
        {field: getattr(fused, field) for field in ("mass", "log_mass", "top_share", "concentration_entropy", "lse")},
        exact)
    same_top = torch.equal(fused.top_token.cpu(), exact["top_token"])
    ok = worst < 1e-4 and same_top
    print(f"  check vs float64 reference: max relative error {worst:.2e}, top_token "
          f"{'identical' if same_top else 'DIFFERS'} -> {'OK' if ok else 'FAILED'}")
    best_mass, best = (t.cpu() for t in fused.mass.max(-1))
    available = torch.nonzero(best_mass > 0.5).flatten()
    share = fused.top_share.cpu()[available, best[available]]
    print(f"  {available.numel()} positions have a concept with mass > 0.5; most and least concentrated:")
    print(f"    {'position':>8} {'concept':>8} {'mass':>7} {'top_share':>10} {'entropy':>8} {'top token':>10}")
    order = available[torch.argsort(share, descending=True)].tolist()
    for position in dict.fromkeys(order[:2] + order[-2:]):  # distinct, in order
        c = int(best[position])
        print(f"    {position:>8} {c:>8} {fused.mass[position, c]:>7.3f} {fused.top_share[position, c]:>10.3f} "
              f"{fused.concentration_entropy[position, c]:>8.3f} {int(fused.top_token[position, c]):>10}")

    fused_s = _median_seconds(lambda: concept_mass(logits, concepts), device, repeats=5)
    eager_s = _median_seconds(
        lambda: reference.concept_mass(logits, concepts.token_ids, concepts.offsets), device, repeats=3
    )
    _timing_table(logits, fused_s, "eager PyTorch (softmax, gather, sums)", eager_s)
    return ok


def _demo_bridge(device: torch.device, num_tokens: int, vocab: int, seed: int) -> bool:
    generator = torch.Generator().manual_seed(seed)
    teacher = 3 * torch.randn(num_tokens, vocab, generator=generator)
    student = (0.5 * teacher + 2 * torch.randn(num_tokens, vocab, generator=generator)).to(device)
    teacher = teacher.to(device)
    print(f"bridge_loss: N={num_tokens} rows, V={vocab}, float32 on {device}, forward and backward")

    def fused_step(beta: float, direction: str = "forward"):
        z = student.detach().requires_grad_()
        loss = bridge_loss(z, teacher, beta=beta, direction=direction)
        return (loss, *torch.autograd.grad(loss, z))

    def eager_step(beta: float, direction: str = "forward", dtype=torch.float32):
        z = student.detach().to(dtype).requires_grad_()
        loss = reference.bridge_loss(z, teacher.to(dtype), beta=beta, direction=direction)
        return (loss, *torch.autograd.grad(loss, z))

    worst = 0.0
    print(f"    {'beta':>5} {'direction':>9} {'loss':>9}")
    for beta, direction in ((0.0, "forward"), (0.5, "forward"), (1.0, "forward"), (0.5, "reverse")):
        loss, grad = fused_step(beta, direction)
        exact_loss, exact_grad = (t.cpu() for t in eager_step(beta, direction, torch.float64))
        worst = max(worst, _worst_relative_error({"loss": loss, "grad": grad}, {"loss": exact_loss, "grad": exact_grad}))
        print(f"    {beta:>5.2f} {direction:>9} {loss.item():>9.5f}")
    ok = worst < 1e-4
    print(f"  check loss and gradient vs float64 reference: max relative error {worst:.2e} -> {'OK' if ok else 'FAILED'}")
    fused_s = _median_seconds(lambda: fused_step(0.5), device, repeats=5)
    eager_s = _median_seconds(lambda: eager_step(0.5), device, repeats=3)
    _timing_table(student, fused_s, "eager PyTorch (log_softmax, KL, autograd)", eager_s)
    return ok


# ---------------------------------------------------------------- sink heads

DEMO_PLANTED = {0: [2, 5], 1: [6], 3: [1]}  # (layer: heads) the demo model's planted sink heads


def _print_head_table(table, top: int) -> None:
    print(f"    {'rank':>4} {'layer':>5} {'head':>4} {'sink_score':>10}")
    for row in table.sort_values("rank").head(top).itertuples():
        print(f"    {row.rank:>4} {row.layer:>5} {row.head:>4} {row.sink_score:>10.4f}")


def _pruning_report(model, tokenizer, texts, table, fraction: float, seed: int, batch_size: int, max_length: int,
                    *, progress: bool):
    """Perplexity unpruned, with the top `fraction` sink heads pruned (head mask), and with as many
    random other heads pruned; returns (baseline, top, random)."""
    from .methods import sinks

    top = sinks.top_heads(table, fraction)
    control = sinks.random_heads(table, len(top), seed=seed, exclude=top)
    settings = dict(batch_size=batch_size, max_length=max_length, progress=progress)
    baseline = sinks.perplexity(model, tokenizer, texts, **settings)
    with sinks.prune_heads(model, top, mode="mask"):
        pruned_top = sinks.perplexity(model, tokenizer, texts, **settings)
    with sinks.prune_heads(model, control, mode="mask"):
        pruned_random = sinks.perplexity(model, tokenizer, texts, **settings)
    if not all(math.isfinite(value) for value in (baseline, pruned_top, pruned_random)):  # (NaN logits: exit 0)
        raise FloatingPointError(f"perplexity {baseline}, {pruned_top} with the top sink heads pruned, "
                                 f"{pruned_random} with random ones: not finite (the model's outputs overflow or "
                                 "are NaN?)")
    print(f"  perplexity {baseline:12.4f}  unpruned")
    print(f"             {pruned_top:12.4f}  top {len(top)} of {len(table)} sink heads pruned (--prune {fraction:g}; "
          "head mask)")
    print(f"             {pruned_random:12.4f}  {len(control)} random other heads pruned (seed {seed})")
    return baseline, pruned_top, pruned_random


def _demo_sinks(device: torch.device, seed: int, length: int) -> bool:
    from . import integrations
    from .methods import sinks
    from .models import DEMO_TEXTS, plant_sink_heads, tiny_model, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    shape = dict(vocab_size=len(tokenizer), num_layers=4, num_heads=8, hidden_size=128, seed=seed)
    planted = sorted((layer, head) for layer, heads in DEMO_PLANTED.items() for head in heads)
    model = plant_sink_heads(tiny_model("llama", **shape).to(device), DEMO_PLANTED)
    eager = plant_sink_heads(tiny_model("llama", attn_implementation="eager", **shape).to(device), DEMO_PLANTED)
    print("sink heads: a built-in Llama-architecture model, 4 layers x 8 heads, hidden 128, float32 on "
          f"{device}, {len(DEMO_TEXTS)} built-in texts.")
    print(f"  Its weights are RANDOM (built from a config, seed {seed}), except {len(planted)} planted sink heads "
          f"{planted}: it is not a trained model, so the scores and perplexities only show the pipeline at work.")

    batch = {name: value.to(device) for name, value in tokenizer(DEMO_TEXTS, padding=True, return_tensors="pt").items()}
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        want = eager(**batch, output_attentions=True)
        integrations.patch(model)
        with integrations.record_attention(model) as record:
            got = model(**batch).logits
        integrations.unpatch(model)
    first = batch["attention_mask"].argmax(-1).view(-1, 1, 1, 1)
    eager_sink = torch.stack([
        (w.gather(-1, first.expand(*w.shape[:3], 1))[..., 0] * real[:, None]).sum((0, 2)) / real.sum()
        for w in want.attentions
    ])
    logit_error = (got - want.logits)[real].abs().max().item()
    sink_error = (record.sink_mass - eager_sink).abs().max().item()
    checks_ok = logit_error < 1e-4 and sink_error < 1e-5
    print(f"  check vs eager attention: logits max |diff| {logit_error:.1e}, sink mass max |diff| {sink_error:.1e} "
          f"-> {'OK' if checks_ok else 'FAILED'}")

    table = sinks.score_heads(model, tokenizer, DEMO_TEXTS, batch_size=8, progress=False)
    found = sorted(sinks.top_heads(table, len(planted) / len(table))) == planted
    verdict = "rank first -> OK" if found else "DO NOT rank first -> FAILED"
    print(f"  strongest sink heads of {len(table)} (the planted ones {verdict}):")
    _print_head_table(table, len(planted) + 2)
    _pruning_report(model, tokenizer, DEMO_TEXTS, table, len(planted) / len(table), seed, 8, 512,
                    progress=False)

    ids = torch.randint(3, len(tokenizer), (2, length), generator=torch.Generator().manual_seed(seed)).to(device)
    print(f"  recording sink mass per layer and head, batch 2 x {length} tokens:")

    def fused():
        with integrations.record_attention(model) as run:
            model(input_ids=ids, use_cache=False)
        return run.sink_mass

    def eager_weights():
        weights = eager(input_ids=ids, output_attentions=True, use_cache=False).attentions
        return torch.stack([w[..., 0].mean((0, 2)) for w in weights])

    def plain():
        return model(input_ids=ids, use_cache=False).logits

    with torch.no_grad():
        fused_s = _median_seconds(fused, device, repeats=7)
        eager_s = _median_seconds(eager_weights, device, repeats=2)
        plain_s = _median_seconds(plain, device, repeats=7)
    backend = resolve(ids.device, torch.float32, "demo")
    print(f"    {'implementation':<52}{'median ms':>10}{'speed-up':>10}")
    for name, seconds in ((f"fastprobe.record_attention ({backend} backend)", fused_s),
                          ("eager attention, output_attentions=True", eager_s),
                          ("the normal forward (sdpa), no statistics", plain_s)):
        print(f"    {name:<52}{seconds * 1e3:>10.1f}{eager_s / seconds:>9.1f}x")
    return checks_ok and found


# ---------------------------------------------------------------- contrastive guidance


def _demo_guidance(device: torch.device, seed: int, new_tokens: int = 24) -> bool:
    """Plain, guided (dual-path attention on every layer) and two-pass contrastive generation on
    the tiny LLaVA: gamma = 0 must give the plain tokens and logits; then tokens per second."""
    import numpy as np

    from .methods import guidance
    from .models import IMAGE_TOKEN, tiny_llava, tiny_llava_processor

    shape = dict(num_layers=4, hidden_size=128, num_heads=8, num_kv_heads=4, image_size=56, patch_size=14)
    processor = tiny_llava_processor(image_size=56, patch_size=14)
    model = tiny_llava(processor, seed=seed, **shape).to(device)
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (64, 48, 3), dtype=np.uint8), rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)]
    prompts = [f"{IMAGE_TOKEN}\nDescribe the picture.", f"Here is a photo. {IMAGE_TOKEN} What is in it?"]
    batch = guidance.prepare_inputs(model, processor, images, prompts)
    image_tokens = int((batch["input_ids"][0] == processor.image_token_id).sum())
    print(f"contrastive guidance: a built-in LLaVA (CLIP vision tower + Llama text model, 4 layers x 8 heads, "
          f"hidden 128), float32 on {device}, 2 left-padded prompts with {image_tokens} image tokens each.")
    print(f"  Its weights are RANDOM (seed {seed}): the generated tokens only show the methods at work.")
    settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    scored = dict(settings, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        plain = model.generate(**batch, **scored)
    same = guidance.guided_generate(model, processor, images, prompts, gamma=0.0, **scored)
    error = max((a - b).abs().max().item() for a, b in zip(same.logits, plain.logits))
    ok = torch.equal(same.sequences, plain.sequences) and error < 1e-4
    print(f"  check gamma = 0 vs plain generate: same tokens {torch.equal(same.sequences, plain.sequences)}, "
          f"logits max |diff| {error:.1e} -> {'OK' if ok else 'FAILED'}")

    guided = guidance.guided_generate(model, processor, images, prompts, gamma=1.0, **settings)
    changed = (guided[:, -new_tokens:] != plain.sequences[:, -new_tokens:]).float().mean().item()
    print(f"  gamma = 1 on every layer changes {changed:.0%} of the {new_tokens} greedy tokens per prompt")
    with torch.no_grad():
        plain_s = _median_seconds(lambda: model.generate(**batch, **settings), device, repeats=3)
        with guidance.guidance(model, gamma=1.0):
            guided_s = _median_seconds(lambda: model.generate(**batch, **settings), device, repeats=3)
        with guidance.two_pass_contrast(model, alpha=1.0):
            two_pass_s = _median_seconds(lambda: model.generate(**batch, **settings), device, repeats=3)
    backend = resolve(device, torch.float32, "demo")
    tokens = 2 * new_tokens
    print(f"  generating {new_tokens} tokens for each of the 2 prompts (KV cache, greedy):")
    print(f"    {'implementation':<52}{'median ms':>10}{'tokens/s':>10}{'vs plain':>10}")
    for name, seconds in (("plain generate (sdpa)", plain_s),
                          (f"fastprobe guidance, one pass ({backend} backend)", guided_s),
                          ("two-pass contrastive decoding", two_pass_s)):
        print(f"    {name:<52}{seconds * 1e3:>10.1f}{tokens / seconds:>10.0f}{seconds / plain_s:>9.2f}x")
    return ok


# ---------------------------------------------------------------- uncertainty and answer availability


def _confident_model(tokenizer, seed: int, device: torch.device):
    """The built-in Llama with its output layer scaled up, so that its random predictions are
    confident (far from uniform) like a trained model's."""
    from .models import tiny_model

    model = tiny_model("llama", vocab_size=len(tokenizer), num_layers=2, hidden_size=64, seed=seed)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30.0)
    return model.to(device)


def _noisy_copies(model, count: int, scale: float, seed: int) -> list:
    """Copies of `model` whose output layers get independent Gaussian noise of `scale` times
    their entries' standard deviation: drafts that agree with it less as the scale grows."""
    import copy

    generator = torch.Generator().manual_seed(seed)
    copies = []
    for _ in range(count):
        draft = copy.deepcopy(model)
        weight = draft.get_output_embeddings().weight
        with torch.no_grad():
            noise = torch.randn(weight.shape, generator=generator).to(weight.device)
            weight.add_(scale * weight.std() * noise)
        copies.append(draft)
    return copies


def _demo_methods(device: torch.device, seed: int) -> bool:
    """Draft uncertainty with drafts planted near and far from the target; answer availability of
    the model's own answers vs the texts' true next words."""
    from .methods import availability, uncertainty
    from .models import DEMO_TEXTS, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    target = _confident_model(tokenizer, seed, device)
    print(f"draft uncertainty and answer availability: the built-in Llama (2 layers, hidden 64) on {device}, its "
          "output layer scaled up so that it predicts confidently.")
    print(f"  Its weights are RANDOM (seed {seed}): the figures only show the methods at work.")
    means = {}
    for scale in (0.1, 0.5):
        drafts = _noisy_copies(target, 3, scale, seed)
        tokens = uncertainty.token_uncertainty(target, drafts, tokenizer, DEMO_TEXTS, batch_size=8, progress=False)
        means[scale] = tokens[list(uncertainty.MEASURES)].mean()
    near, far = means[0.1], means[0.5]
    ok = bool((far > near).all())
    print(f"  3 drafts = the target with noise on its output layer; mean per token over {len(tokens)} tokens of "
          f"{len(DEMO_TEXTS)} texts:")
    print(f"    {'drafts':<24}{'epistemic':>11}{'jsd':>9}{'kl(m||p)':>10}")
    for name, values in (("noise 0.1 (near)", near), ("noise 0.5 (far)", far)):
        print(f"    {name:<24}{values['epistemic']:>11.4f}{values['jsd']:>9.4f}{values['kl_mixture_target']:>10.4f}")
    print(f"  farther drafts give more uncertainty on every measure -> {'OK' if ok else 'FAILED'}")

    prompts = [" ".join(text.split()[:5]) for text in DEMO_TEXTS[:8]]
    own = [answer.strip() for answer in availability.greedy_answers(target, tokenizer, prompts, max_new_tokens=2,
                                                                progress=False)]
    truth = [text.split()[5].strip(",.:") for text in DEMO_TEXTS[:8]]
    # even rows: the model's own answer, unless it is empty or cut inside a character (U+FFFD)
    from_model = [i % 2 == 0 and own[i] != "" and "\ufffd" not in own[i] for i in range(len(prompts))]
    answers = [own[i] if from_model[i] else truth[i] for i in range(len(prompts))]
    table = availability.answer_availability(target, tokenizer, prompts, answers, threshold=0.5, max_new_tokens=2,
                                             progress=False)
    print("  answer availability: gold answer = the model's own greedy answer (even rows, where it is whole text) "
          "or the text's true next word:")
    print(f"    {'prompt':<30}{'gold':>12}{'from':>7}{'mass':>10}{'available':>10}{'top_share':>10}  generated")
    for index, row in table.iterrows():
        share = _share_text(row["top_share"])
        source = "model" if from_model[index] else "text"
        print(f"    {prompts[index][:29]:<30}{_cell(row['answer'], 11):>12}{source:>7}{row['mass']:>10.2e}"
              f"{str(row['available']):>10}{share:>10}  {row['generated']!r}")
    print(_SHARE_LEGEND)
    summary = availability.by_correctness(table)
    print(f"  mean mass: correct answers {summary.loc[True, 'mass']:.3f}, incorrect {summary.loc[False, 'mass']:.2e}")
    return ok


def _read_lines(path: str, option: str) -> list[str]:
    """The lines of a UTF-8 text file, the command's `option` (a file that is missing, a folder or
    not UTF-8 is named with its option in the error). A byte order mark at its start (Windows
    tools write one) is not text; lines end at \n, \r\n or \r only: not at the other breaks
    str.splitlines knows (a form feed, U+2028, U+0085), which a text or a JSON string may hold,
    so a line's number is the one an editor shows."""
    try:
        return Path(path).read_text(encoding="utf-8-sig").split("\n")  # (read_text makes \r\n and \r \n)
    except UnicodeDecodeError as error:
        raise ValueError(f"{option} {path} is not UTF-8 text ({error})") from None
    except OSError as error:
        raise ValueError(f"{option} {path}: {error.strerror or error}") from None


def _read_texts(path: str) -> list[str]:
    texts = [line.strip() for line in _read_lines(path, "--texts") if line.strip()]
    if not texts:
        raise ValueError(f"{path} holds no text (one text per line)")
    return texts


def _read_questions(path: str) -> tuple[list, list, list | None]:
    """(prompts, answers, correct or None) from a JSON Lines file: {"prompt": ..., "answers":
    alias or [aliases], optional "correct": true / false} per line."""
    import json

    prompts, answers, correct = [], [], []
    for number, line in enumerate(_read_lines(path, "--questions"), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            prompt, aliases = item["prompt"], item["answers"]
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path}:{number}: each line must be a JSON object with \"prompt\" and \"answers\" "
                             f"({error!r})") from None
        if not isinstance(prompt, str):
            raise ValueError(f"{path}:{number}: \"prompt\" must be a string, got {prompt!r}")
        if not (isinstance(aliases, str) or isinstance(aliases, list) and all(isinstance(a, str) for a in aliases)):
            raise ValueError(f"{path}:{number}: \"answers\" must be a string or a list of strings, got {aliases!r}")
        if not any(alias.strip() for alias in ([aliases] if isinstance(aliases, str) else aliases)):
            raise ValueError(f"{path}:{number}: \"answers\" needs an alias that is not blank, got {aliases!r}")
        judged = item.get("correct")
        if judged is not None and not isinstance(judged, bool):
            raise ValueError(f"{path}:{number}: \"correct\" must be true or false, got {judged!r}")
        prompts.append(prompt)
        answers.append(aliases)
        correct.append(judged)
    if not prompts:
        raise ValueError(f"{path} holds no question")
    judged = [c for c in correct if c is not None]
    if judged and len(judged) != len(correct):
        raise ValueError(f"{path}: give \"correct\" on every line or on none")
    return prompts, answers, (correct if judged else None)


def _device_of(args: argparse.Namespace) -> str:
    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _device(text: str) -> str:
    """--device: a device torch knows and this machine has (checked before any model loads)."""
    try:
        device = torch.device(text)
    except RuntimeError as error:
        raise argparse.ArgumentTypeError(f"not a device: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: this torch sees no CUDA device")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():  # (else a traceback, later)
        raise argparse.ArgumentTypeError(f"{text}: this torch sees {torch.cuda.device_count()} CUDA device(s), "
                                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text}: fastprobe runs on cpu or cuda")
    return text


def _check_outputs(csv: Optional[str], plot: Optional[str] = None, inputs: Sequence[tuple[str, str]] = ()) -> None:
    """Where the command will write, checked before any model runs: a file it may write in an
    existing folder, and for the plot a format matplotlib writes (and matplotlib itself), not the
    CSV's file, and neither an input's: inputs are (option, path) pairs, a file the command reads
    or a checkpoint folder, none of whose files it may write over."""
    if csv and plot and Path(csv).resolve() == Path(plot).resolve():  # (the table overwrote the heat map)
        raise ValueError(f"--csv {csv} and --plot {plot} are the same file: give each its own")
    outputs = [(option, path) for option, path in (("--csv", csv), ("--plot", plot)) if path]
    for (option, path), (input_option, input_path) in itertools.product(outputs, inputs):
        output, read = Path(path).resolve(), Path(input_path).resolve()
        if output == read or output.exists() and read in output.parents:  # (the run's end wrote over it)
            where = "the file" if output == read else "a file in the folder"
            raise ValueError(f"{option} {path} would write over {where} of {input_option} {input_path}: "
                             "give another path")
    for path in filter(None, (csv, plot)):
        if not Path(path).parent.is_dir():
            raise ValueError(f"{path}: there is no folder {Path(path).parent} to write it into")
        if Path(path).is_dir():
            raise ValueError(f"{path} is a folder: give a file name to write to")
        existed = Path(path).exists()
        try:  # (appending nothing: an existing file is left as it is until the command writes it)
            with open(path, "a"):
                pass
        except OSError as error:
            raise ValueError(f"{path} cannot be written: {error.strerror or error}") from None
        if not existed:
            Path(path).unlink()
    if plot:
        try:
            import matplotlib
            from matplotlib.backends.backend_agg import FigureCanvasAgg
        except ImportError:
            raise ImportError("--plot needs matplotlib: pip install 'fastprobe[plot]'") from None
        formats = FigureCanvasAgg.get_supported_filetypes()
        suffix = Path(plot).suffix.lstrip(".").lower()
        if suffix not in formats:
            raise ValueError(f"--plot {plot}: matplotlib writes {', '.join(sorted(formats))} (by extension), "
                             f"not {suffix or 'a file without an extension'}")
        texsystem = matplotlib.rcParams["pgf.texsystem"]
        if suffix == "pgf" and shutil.which(texsystem) is None:  # (matplotlib's pgf backend runs TeX)
            raise ValueError(f"--plot {plot}: matplotlib writes pgf with {texsystem}, which is not installed "
                             "(on the PATH); give another extension, e.g. .pdf")


def _check_prune(fraction: float, num_heads: int) -> None:
    """--prune prunes round(fraction x heads) top heads, then as many random other heads."""
    count = int(round(fraction * num_heads))
    if 2 * count > num_heads:
        raise ValueError(f"--prune {fraction}: the top {count} of the model's {num_heads} heads leave "
                         f"{num_heads - count} others, fewer than the {count} random heads to compare with; "
                         f"give a fraction of at most {num_heads // 2}/{num_heads}")


def _one_line(error: BaseException, limit: int = 400) -> str:
    """An exception's message on one line (transformers' run over several), cut at `limit` characters."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _load_model(path: str, device: str, dtype: str):
    """A local causal-LM checkpoint (no downloads) on `device`, in eval mode. A folder that is not
    one (no config.json, a model transformers has no causal-LM class for, an encoder such as BERT,
    a head the checkpoint lacks weights for: random) or that fails to load (a corrupt weights file,
    sizes that do not match the config) is refused in one line naming the folder."""
    import transformers
    from packaging.version import Version
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if Path(path).is_file():
        raise ValueError(f"{path} is a file: give the checkpoint's folder (with config.json and the weights)")
    if not Path(path).is_dir():
        raise ValueError(f"{path}: no such checkpoint folder (fastprobe loads local checkpoints only)")
    if not (Path(path) / "config.json").is_file():
        raise ValueError(f"{path}: no config.json there, so not a transformers checkpoint folder")
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as error:  # (what transformers raises varies: OSError, ValueError, KeyError...)
        raise ValueError(f"{path}: its config.json could not be read ({_one_line(error)})") from None
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ValueError(f"{path} holds a {config.model_type!r} model, which transformers has no causal language "
                         "model class for; fastprobe's commands take causal (decoder-only) language models")
    options = dict(local_files_only=True, output_loading_info=True)
    if dtype != "auto":  # transformers 4.56 renamed torch_dtype to dtype
        name = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
        options[name] = getattr(torch, dtype)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # (its load report: what is refused below is said in one line)
    try:
        model, loading = transformers.AutoModelForCausalLM.from_pretrained(path, **options)
    except ImportError:  # (a package the model needs: its own message says which)
        raise
    except Exception as error:  # a corrupt file, sizes that do not match the config, ...
        raise ValueError(f"{path}: the checkpoint could not be loaded ({type(error).__name__}: "
                         f"{_one_line(error)})") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    _check_causal(model, path)  # (an encoder's missing language-model head is not the news)
    missing = sorted(loading["missing_keys"])
    if missing:
        raise ValueError(f"{path}: the checkpoint has no weights for {len(missing)} of {type(model).__name__}'s "
                         f"parameters (e.g. {missing[0]}), which would be random; is it a causal language model?")
    return model.to(device).eval()


def _check_causal(model, path: str) -> None:
    """Refuses a model whose attention layers all say they are not causal (BERT and other encoders
    that AutoModelForCausalLM loads: each token would see the tokens after it). Attention modules
    say so in is_causal (transformers 5; is_decoder in 4.x's BERT-like layers)."""
    from .integrations._lookups import _named_attention

    flags = [getattr(module, "is_causal", getattr(module, "is_decoder", None))
             for module in model.modules() if _named_attention(type(module))]
    flags = [flag for flag in flags if isinstance(flag, bool)]
    if flags and not any(flags):
        raise ValueError(f"{path}: its attention is bidirectional ({type(model).__name__}: an encoder, not a causal "
                         "language model); fastprobe's commands take causal (decoder-only) language models")


# the files a saved tokenizer writes, one at least: tokenizer.json / tokenizer_config.json, or a
# slow tokenizer's own (vocab.json, vocab.txt, merges.txt, a sentencepiece .model)
_TOKENIZER_FILES = ("tokenizer*", "vocab*", "merges.txt", "*.model")


def _load_checkpoint(path: str, device: str, dtype: str):
    """(model, tokenizer) of a local checkpoint."""
    import transformers

    model = _load_model(path, device, dtype)
    if not _has_tokenizer_files(path):
        raise ValueError(f"{path}: the folder has no tokenizer files (tokenizer.json, tokenizer_config.json, ...); "
                         "save the tokenizer with the model (tokenizer.save_pretrained)")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as error:  # (none, or a corrupt one: a KeyError from tokenizer.json, ...); transformers' reason
        raise ValueError(f"{path}: no tokenizer could be loaded from the checkpoint folder ({type(error).__name__}: "
                         f"{_one_line(error)})") from None
    return model, tokenizer


def _has_tokenizer_files(path: str) -> bool:
    return any(any(Path(path).glob(pattern)) for pattern in _TOKENIZER_FILES)


def _check_draft_tokenizer(path: str, tokenizer) -> None:
    """A draft checkpoint that has a tokenizer must give each of the target tokenizer's tokens the
    same id (tokens it adds after them are ignored, like padding rows of the logits); a folder
    without tokenizer files is taken on trust, one whose tokenizer cannot be loaded is refused (a
    truncated tokenizer.json raises a ValueError, which is not the absence of a tokenizer)."""
    import transformers

    if not _has_tokenizer_files(path):  # (nor a folder: _load_model names it)
        return
    try:
        draft_vocabulary = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True).get_vocab()
    except Exception as error:  # a corrupt one, or one that needs a package not installed
        raise ValueError(f"--drafts {path}: its tokenizer could not be loaded ({type(error).__name__}: "
                         f"{_one_line(error)})") from None
    differ = [token for token, index in tokenizer.get_vocab().items() if draft_vocabulary.get(token) != index]
    if differ:
        raise ValueError(f"--drafts {path}: its tokenizer is not the target's ({len(differ)} of the target's "
                         f"{len(tokenizer)} tokens have another id or none there, e.g. {differ[0]!r}); the drafts "
                         "must share the target's tokenizer")


def sinks_command(args: argparse.Namespace) -> int:
    from . import integrations
    from .integrations.transformers import layer_heads
    from .methods import sinks

    try:
        _check_outputs(args.csv, args.plot, [("--model", args.model), ("--texts", args.texts)])
        texts = _read_texts(args.texts)
        device = _device_of(args)
        model, tokenizer = _load_checkpoint(args.model, device, args.dtype)
        max_length = args.max_length or default_max_length(model, tokenizer)
        _check_a_token_to_predict(tokenizer, texts, max_length)
        integrations.patch(model)
        layers = integrations.attention_layers(model)
        if args.prune is not None:
            _check_prune(args.prune, sum(count or 0 for count in layer_heads(layers)))
        parameter = next(model.parameters())
        print(f"fastprobe sinks: {args.model} ({type(model).__name__}, {len(layers)} layers), {len(texts)} texts, "
              f"{device}, {resolve(parameter.device, parameter.dtype, 'sinks')} backend")
        table = sinks.score_heads(model, tokenizer, texts, batch_size=args.batch_size, max_length=max_length,
                                  progress=not args.no_progress)
        print(f"  strongest sink heads of {len(table)}:")
        _print_head_table(table, args.top)
        if args.prune is not None:
            _pruning_report(model, tokenizer, texts, table, args.prune, args.seed, args.batch_size, max_length,
                            progress=not args.no_progress)
        if args.plot:
            print(f"  heat map: {sinks.plot_sink_heads(table, args.plot, title=f'sink score: {Path(args.model).name}')}")
        _save_table(table, args.csv, "table", index=False)
    except (OSError, ValueError, TypeError, NotImplementedError, ImportError, FloatingPointError) as error:
        print(f"fastprobe sinks: error: {error}", file=sys.stderr)
        return 2
    return 0


def _check_a_token_to_predict(tokenizer, texts: list[str], max_length: int) -> None:
    """sinks needs a text of two tokens at least, a token to score and one to predict (with none,
    every head scored 1.0, a first token seeing itself alone, and --prune failed after the table)."""
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
    if max(lengths) < 2:
        raise ValueError(f"no token to predict: every text has fewer than two tokens (at most --max-length "
                         f"{max_length} each)")


def _cell(text: str, width: int) -> str:
    """A text for a table's cell: its first `width` characters, those that are not printable
    escaped as in Python (an answer's newline broke its row in two)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))[:width]


def _share_text(top_share: float) -> str:
    """A row's top_share for the availability tables: "-" where it is NaN (see _SHARE_LEGEND)."""
    return "-" if top_share != top_share else f"{top_share:.2f}"


_SHARE_LEGEND = ("  top_share: the share of the answer's single-token forms' mass on the likeliest one "
                 "(- : the answer has no single-token form)")


def _save_table(table, path, label: str, index: bool) -> None:
    """The command's DataFrame as CSV at `path` (None: not written), said on stdout."""
    if path:
        table.to_csv(path, index=index)
        print(f"  {label}: {path}")


def uncertainty_command(args: argparse.Namespace) -> int:
    from .methods import uncertainty

    try:
        _check_outputs(args.csv, inputs=[("--target", args.target), *(("--drafts", path) for path in args.drafts),
                                         ("--texts", args.texts)])
        texts = _read_texts(args.texts)
        device = _device_of(args)
        target, tokenizer = _load_checkpoint(args.target, device, args.dtype)
        for path in args.drafts:
            _check_draft_tokenizer(path, tokenizer)
        drafts = [_load_model(path, device, args.dtype) for path in args.drafts]
        max_length = args.max_length or default_max_length(target, tokenizer, drafts)
        tokens = uncertainty.token_uncertainty(target, drafts, tokenizer, texts, temperature=args.temperature,
                                               batch_size=args.batch_size, max_length=max_length,
                                               progress=not args.no_progress)
        if len(tokens) == 0:
            raise ValueError(f"no token to score: every text has fewer than two tokens (at most --max-length "
                             f"{max_length} each)")
    except (OSError, ValueError, TypeError, ImportError) as error:
        print(f"fastprobe uncertainty: error: {error}", file=sys.stderr)
        return 2
    scores = uncertainty.sequence_scores(tokens)
    print(f"fastprobe uncertainty: target {args.target}, {len(drafts)} drafts, {len(texts)} texts, "
          f"{len(tokens)} tokens scored")
    print("  most uncertain tokens (nats):")
    print(f"    {'text':>5}{'pos':>6}  {'token':<16}{'epistemic':>11}{'jsd':>9}{'kl(m||p)':>10}")
    for _, row in tokens.nlargest(args.top, "epistemic").iterrows():
        print(f"    {row['text']:>5}{row['position']:>6}  {row['token']!r:<16}{row['epistemic']:>11.4f}"
              f"{row['jsd']:>9.4f}{row['kl_mixture_target']:>10.4f}")
    print("  per text (nats):")
    print(f"    {'text':>5}{'tokens':>7}{'epistemic sum':>15}{'mean':>9}  start")
    for index, row in scores.iterrows():
        print(f"    {index:>5}{int(row['num_tokens']):>7}{row['epistemic_sum']:>15.4f}{row['epistemic_mean']:>9.4f}  "
              f"{texts[index][:48]!r}")
    _save_table(tokens, args.csv, "token table", index=False)
    return 0


def availability_command(args: argparse.Namespace) -> int:
    from .methods import availability, uncertainty

    try:
        _check_outputs(args.csv, inputs=[("--model", args.model), ("--questions", args.questions)])
        prompts, answers, correct = _read_questions(args.questions)
        model, tokenizer = _load_checkpoint(args.model, _device_of(args), args.dtype)
        table = availability.answer_availability(
            model, tokenizer, prompts, answers, threshold=args.threshold, generate=correct is None,
            max_new_tokens=args.max_new_tokens, correct=correct, batch_size=args.batch_size,
            max_length=args.max_length, progress=not args.no_progress)
    except (OSError, ValueError, TypeError, ImportError) as error:
        print(f"fastprobe availability: error: {error}", file=sys.stderr)
        return 2
    print(f"fastprobe availability: {args.model}, {len(prompts)} questions, threshold {args.threshold}")
    print(f"    {'#':>4}  {'answer':<16}{'mass':>10}{'available':>10}{'top_share':>10}{'correct':>8}")
    for index, row in table.iterrows():
        share = _share_text(row["top_share"])
        print(f"    {index:>4}  {_cell(row['answer'], 15):<16}{row['mass']:>10.3g}{str(row['available']):>10}"
              f"{share:>10}{str(row['correct']):>8}")
    print(_SHARE_LEGEND)
    summary = availability.by_correctness(table)
    print("  correct vs incorrect: count, mean mass, share available, mean top_share")
    for judged, row in summary.iterrows():
        print(f"    {'correct' if judged else 'incorrect':<10}{int(row['count']):>6}{row['mass']:>10.3g}"
              f"{row['available']:>10.2f}{row['top_share']:>10.3f}")
    if summary["count"].min() > 0:
        print(f"  AUROC of mass for telling correct answers: {uncertainty.auroc(table['mass'], table['correct']):.3f}")
    _save_table(table, args.csv, "table", index=True)
    return 0


def demo(args: argparse.Namespace) -> int:
    device = torch.device(_device_of(args))
    print(f"fastprobe {__version__} demo on {device} ({torch.get_num_threads()} CPU threads)\n")
    try:
        return _demo_sections(device, args)
    except (MemoryError, RuntimeError) as error:  # (torch's allocators raise RuntimeErrors: CPU, CUDA)
        if not isinstance(error, MemoryError) and "alloc" not in str(error) and "out of memory" not in str(error):
            raise
        print(f"fastprobe demo: error: out of memory at --drafts {args.drafts} --tokens {args.tokens} --vocab "
              f"{args.vocab} --length {args.length} (the eager peers hold [drafts, tokens, vocab] probabilities and "
              f"[length, length] weights): give smaller sizes ({_one_line(error, 200)})", file=sys.stderr)
        return 2


def _demo_sections(device: torch.device, args: argparse.Namespace) -> int:
    ok = _demo_divergence(device, args.drafts, args.tokens, args.vocab, args.seed)
    print()
    ok = _demo_concepts(device, args.tokens, args.vocab, args.concepts, args.seed) and ok
    print()
    ok = _demo_bridge(device, args.tokens, args.vocab, args.seed) and ok
    print()
    ok = _demo_sinks(device, args.seed, args.length) and ok
    print()
    ok = _demo_guidance(device, args.seed) and ok
    print()
    ok = _demo_methods(device, args.seed) and ok
    print("\nall checks passed" if ok else "\nSOME CHECKS FAILED")
    return 0 if ok else 1


TEXTS_HELP = "a UTF-8 text file, one text per line (stripped; blank lines skipped; texts numbered from 0)"
BATCH_SIZE_HELP = "texts per forward pass (default 8)"
DTYPE_HELP = "the models' dtype (default auto: the one transformers loads the checkpoint in)"
MAX_LENGTH_DEFAULT_HELP = ("default: the models' context, the fewest positions their configs give (less the tokens "
                           "generated after a prompt), else the tokenizer's model_max_length, else "
                           f"{FALLBACK_MAX_LENGTH}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastprobe", description="fused kernels for looking inside language models")
    parser.add_argument("--version", action="version", version=f"fastprobe {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="version, backends and why one is unavailable, threads, library versions")
    demo_parser = commands.add_parser("demo", help="run the fused ops on a built-in problem, check and time them")
    demo_parser.add_argument("--device", type=_device, default=None,
                                     help="cpu or cuda (default: cuda when available)")
    demo_parser.add_argument("--drafts", type=_positive_int, default=4, help="draft models K (default 4)")
    demo_parser.add_argument("--tokens", type=_positive_int, default=256,
                             help="tokens N of the vocabulary ops (default 256)")
    demo_parser.add_argument("--vocab", type=_positive_int, default=32000, help="vocabulary V (default 32000)")
    demo_parser.add_argument("--concepts", type=_positive_int, default=1000,
                             help="concepts for concept_mass (default 1000)")
    demo_parser.add_argument("--seed", type=_non_negative_int, default=0, help="of every random input (default 0)")
    demo_parser.add_argument("--length", type=_positive_int, default=1024,
                             help="tokens per row for the sink-recording timing (default 1024)")
    sinks_parser = commands.add_parser("sinks", help="score, prune and plot the sink heads of a local checkpoint")
    sinks_parser.add_argument("--model", required=True, help="a local transformers checkpoint folder (no downloads)")
    sinks_parser.add_argument("--texts", required=True, help=TEXTS_HELP)
    sinks_parser.add_argument("--prune", type=_fraction, default=None, metavar="FRACTION",
                              help="prune this fraction of heads (top sink heads, then as many random ones) and "
                                   "report perplexity")
    sinks_parser.add_argument("--plot", default=None, metavar="PATH", help="write a layer x head heat map (matplotlib)")
    sinks_parser.add_argument("--csv", default=None, metavar="PATH", help="write the head table as CSV")
    sinks_parser.add_argument("--top", type=_positive_int, default=10, help="heads to list (default 10)")
    sinks_parser.add_argument("--batch-size", type=_positive_int, default=8, help=BATCH_SIZE_HELP)
    sinks_parser.add_argument("--max-length", type=_integer_at_least(2), default=None,
                              help=f"tokens per text at most (2 at least: a token to score and one to predict; "
                                   f"{MAX_LENGTH_DEFAULT_HELP})")
    sinks_parser.add_argument("--device", type=_device, default=None,
                                     help="cpu or cuda (default: cuda when available)")
    sinks_parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                              help=DTYPE_HELP)
    sinks_parser.add_argument("--seed", type=_non_negative_int, default=0,
                              help="seed of the random heads pruned for comparison (default 0)")
    sinks_parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    uncertainty_parser = commands.add_parser(
        "uncertainty", help="per-token uncertainty of texts under a target checkpoint and its draft checkpoints")
    uncertainty_parser.add_argument("--target", required=True, help="the target model (a local checkpoint folder)")
    uncertainty_parser.add_argument("--drafts", required=True, nargs="+",
                                    help="draft checkpoints sharing the target's tokenizer (a draft folder with "
                                         "another tokenizer is refused)")
    uncertainty_parser.add_argument("--texts", required=True, help=TEXTS_HELP)
    uncertainty_parser.add_argument("--temperature", type=_temperature, default=1.0,
                                    help="divides every logit (default 1)")
    uncertainty_parser.add_argument("--top", type=_positive_int, default=10, help="tokens to list (default 10)")
    availability_parser = commands.add_parser(
        "availability", help="the gold answer's probability mass at the commitment step, for a local checkpoint")
    availability_parser.add_argument("--model", required=True, help="a local transformers checkpoint folder")
    availability_parser.add_argument("--questions", required=True,
                                     help='JSON Lines: {"prompt": ..., "answers": [...], optional "correct": bool}')
    availability_parser.add_argument("--threshold", type=_fraction, default=0.5,
                                     help="available when mass >= this (default 0.5)")
    availability_parser.add_argument("--max-new-tokens", type=_positive_int, default=8,
                                     help="tokens of the greedy answer judged against the aliases (default 8)")
    for method_parser in (uncertainty_parser, availability_parser):
        method_parser.add_argument("--csv", default=None, metavar="PATH", help="write the table as CSV")
        method_parser.add_argument("--batch-size", type=_positive_int, default=8, help=BATCH_SIZE_HELP)
        method_parser.add_argument("--max-length", type=_positive_int, default=None,
                                   help=f"tokens per text at most ({MAX_LENGTH_DEFAULT_HELP})")
        method_parser.add_argument("--device", type=_device, default=None,
                                     help="cpu or cuda (default: cuda when available)")
        method_parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                                   help=DTYPE_HELP)
        method_parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        if args.command != "info":
            _check_backend(torch.device(_device_of(args)))
            _require_packages(args.command)
    except (ValueError, ImportError) as error:
        print(f"fastprobe {args.command}: error: {error}", file=sys.stderr)
        return 2
    commands_run = {"info": lambda: info(), "sinks": lambda: sinks_command(args), "demo": lambda: demo(args),
                    "uncertainty": lambda: uncertainty_command(args),
                    "availability": lambda: availability_command(args)}
    try:
        with _progress_bars(not getattr(args, "no_progress", False)), _warnings_as_lines(args.command):
            done = commands_run[args.command]()
            sys.stdout.flush()  # (a closed pipe found here, not by the flush at exit)
            return done
    except BrokenPipeError as error:  # stdout's reader went away (`fastprobe ... | head`): one line, as sinks says it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (the flush at exit would fail again)
        print(f"fastprobe {args.command}: error: {error}", file=sys.stderr)
        return 2


def _check_backend(device: torch.device) -> None:
    """The backend in force (FASTPROBE_BACKEND, or fastprobe.set_backend) can run on the command's
    device: a ValueError saying why not, before any work."""
    try:
        resolve(device, torch.float32, "")
    except RuntimeError as error:  # ": backend 'triton' cannot run on cpu tensors: ..."
        raise ValueError(f"{str(error).removeprefix(': ')} (the backend in force; without FASTPROBE_BACKEND "
                         "fastprobe chooses one that runs)") from None


def _require_packages(command: str) -> None:
    """The packages every command but info needs besides torch (the demo's model sections too),
    named before any work: an ImportError saying how to install them."""
    missing = []
    for package in ("transformers", "pandas"):
        try:
            importlib.import_module(package)
        except ImportError:
            missing.append(package)
    if missing:
        raise ImportError(f"{command} needs {' and '.join(missing)}: pip install {' '.join(missing)} "
                          "(or pip install 'fastprobe[test]', which has them)")


@contextlib.contextmanager
def _progress_bars(shown: bool):
    """--no-progress: transformers' progress bars (loading a checkpoint's weights) are off too,
    for the command's duration."""
    try:
        from transformers.utils import logging as transformers_logging
    except ImportError:  # (no bars to switch off; a command that needs transformers says so)
        shown = True
    if shown:
        yield
        return

    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()


@contextlib.contextmanager
def _warnings_as_lines(command: str):
    """A warning the methods give the command (they point at its call: a file of this package)
    reads as one line on stderr, "fastprobe <command>: warning: ...", as its errors do, not as a
    file, line and source line; other warnings as Python shows them. For the command's duration."""
    shown = warnings.showwarning
    package = Path(__file__).resolve().parent

    def show(message, category, filename, lineno, file=None, line=None):
        if package in Path(filename).resolve().parents:
            print(f"fastprobe {command}: warning: {message}", file=sys.stderr if file is None else file)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1], got {text!r}")
    return value


def _integer_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer in [minimum, 2^63 - 1] (what torch's sizes and seeds hold), so
    that a bad count or seed ends the command with its usage (exit 2) before any work."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        if value > INT64_MAX:
            raise argparse.ArgumentTypeError(f"must be < 2**63 (an int64), got {value}")
        return value

    return parse


def _temperature(text: str) -> float:
    """--temperature: a number draft_divergence takes, checked before any model loads."""
    try:
        return check_temperature(float(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


_positive_int = _integer_at_least(1)  # counts, sizes and lengths
_non_negative_int = _integer_at_least(0)  # seeds


if __name__ == "__main__":
    sys.exit(main())
