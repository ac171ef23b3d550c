"""Relative error of draft_divergence's divergences against the float64 reference for drafts and a
target close together: logits 3 x randn shared, plus spread x randn per draft and for the target
(K = 3, uniform weights, N = 64, V = 32000, float32). Prints, per spread, the reference's median
value and the median / max relative error over the tokens of the JSD, KL(m || p) and epistemic.

    python bench/divergence_precision.py [--backend cpp|triton]   (triton on CPU: TRITON_INTERPRET=1,
                                                                    a smaller vocabulary)
"""

import argparse

import torch

import fastprobe as fp


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="cpp", choices=["cpp", "triton"])
    args = parser.parse_args()
    on_interpreter = args.backend == "triton" and not torch.cuda.is_available()
    device = "cuda" if args.backend == "triton" and not on_interpreter else "cpu"
    drafts, tokens, vocab = (3, 4, 3000) if on_interpreter else (3, 64, 32000)
    generator = torch.Generator().manual_seed(0)
    base = 3 * torch.randn(tokens, vocab, generator=generator)
    print(f"{args.backend} on {device}, K={drafts} N={tokens} V={vocab}")
    for spread in (1e-1, 1e-2, 1e-3, 1e-4):
        draft = base + spread * torch.randn(drafts, tokens, vocab, generator=generator)
        target = base + spread * torch.randn(tokens, vocab, generator=generator)
        with fp.use_backend(args.backend):
            result = fp.draft_divergence(draft.to(device), target.to(device))
        reference = fp.draft_divergence(draft.double(), target.double())
        for field in ("jsd", "kl_mixture_target", "epistemic"):
            want = getattr(reference, field)
            error = ((getattr(result, field).cpu().double() - want).abs() / want.abs())
            print(f"spread {spread:g} {field:18s} value {want.median():.3g}  relative error median "
                  f"{error.median():.2e} max {error.max():.2e}")


if __name__ == "__main__":
    main()
