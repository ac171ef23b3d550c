"""bridge_loss, BridgeLoss, beta_schedule and FusedLinearBridgeLoss against the float64
reference and autograd of it, and bad input."""

import contextlib
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastprobe as fp
from fastprobe import reference
from fastprobe.ops.bridge import beta_tensor

from .conftest import ATOL, RTOL, TORCH_RELEASE, same_bits_per_row, spawn_gloo_ranks

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BETAS = [0.0, 0.37, 1.0, 2.0]
# compiles of a 10-step beta schedule driven by an int step (BridgeLoss(step=...)): the first
# value, then one graph that takes step (and so beta) as an input. Older dynamo (torch 2.4)
# specializes the int step on its first three values (0, 1, 2) before making it symbolic: 4.
SCHEDULE_COMPILES = 2 if TORCH_RELEASE >= (2, 11) else 4


def shapes_for(target):
    backend, device = target
    if device == "cpu" and backend == "triton":
        return [(7, 301), (3, 1)]
    return [(37, 1271), (5, 4099), (2, 1)]


def random_labels(num_rows, device, ignore_index=-100):
    labels = torch.randint(0, 5, (num_rows,), device=device)
    labels[torch.rand(num_rows, device=device) < 0.3] = ignore_index
    return labels


def expected(student, teacher, **kwargs):
    """Loss and gradient from autograd of the float64 reference on the same rounded values."""
    z = student.detach().double().requires_grad_()
    loss = reference.bridge_loss(z, teacher.double(), **kwargs)
    (loss.sum() if loss.dim() else loss).backward()
    return loss.detach().cpu(), z.grad.cpu()


def grad_tolerance(dtype, reference_grad, student, temperature=1.0):
    """The fused gradient is stored in the logits' dtype: allow that dtype's rounding. float32:
    each entry is a difference of terms up to max P_S / T ((P - Q) / T, or P (g - KL) / T,
    which cancels terms of the size of the row's KL), so a few float32 ulps of the larger of
    those and the largest gradient entry (near-equal P and Q give a gradient of rounding
    size only)."""
    largest_p = torch.softmax(student.detach().double().cpu() / temperature, dim=-1).nan_to_num().max().item()
    scale = max(reference_grad.abs().max().item(), largest_p / temperature) + 1e-30
    eps = {torch.float32: 5e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    return dict(rtol=eps, atol=eps * scale)


def run(student, teacher, **kwargs):
    z = student.detach().clone().requires_grad_()
    loss = fp.bridge_loss(z, teacher, **kwargs)
    (loss.sum() if loss.dim() else loss).backward()
    return loss.detach(), z.grad


def assert_matches(student, teacher, **kwargs):
    loss, grad = run(student, teacher, **kwargs)
    want_loss, want_grad = expected(student, teacher, **kwargs)
    assert loss.dtype == torch.float32 and grad.dtype == student.dtype
    assert not torch.isnan(loss).any() and not torch.isnan(grad).any()
    torch.testing.assert_close(loss.cpu().double(), want_loss, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(grad.cpu().double(), want_grad, **grad_tolerance(student.dtype, want_grad, student, kwargs.get("temperature", 1.0)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_reference(target, dtype, direction, reduction):
    _, device = target
    for num_rows, vocab in shapes_for(target):
        for beta in BETAS:
            temperature = 1.0 if beta in (0.0, 1.0) else 0.7
            student = (3 * torch.randn(num_rows, vocab)).to(device=device, dtype=dtype)
            teacher = (3 * torch.randn(num_rows, vocab)).to(device=device, dtype=dtype)
            labels = random_labels(num_rows, device)
            assert_matches(student, teacher, beta=beta, temperature=temperature, direction=direction,
                           labels=labels, reduction=reduction)


def test_beta_zero_is_kl_div(target):
    _, device = target
    num_rows, vocab = shapes_for(target)[0]
    student, teacher = torch.randn(num_rows, vocab, device=device), torch.randn(num_rows, vocab, device=device)
    loss = fp.bridge_loss(student, teacher, beta=0.0, reduction="sum")
    kl_div = torch.nn.functional.kl_div(
        torch.log_softmax(student.double(), -1), torch.log_softmax(teacher.double(), -1),
        log_target=True, reduction="sum",
    )
    torch.testing.assert_close(loss.double(), kl_div, rtol=RTOL, atol=ATOL)


def test_ignored_rows_and_custom_ignore_index(target):
    _, device = target
    num_rows, vocab = shapes_for(target)[0]
    student, teacher = torch.randn(num_rows, vocab, device=device), torch.randn(num_rows, vocab, device=device)
    labels = random_labels(num_rows, device, ignore_index=7)
    labels[0] = 7
    loss, grad = run(student, teacher, beta=0.5, labels=labels, ignore_index=7, reduction="none")
    ignored = (labels == 7).cpu()
    assert (loss.cpu()[ignored] == 0).all() and (grad.cpu()[ignored] == 0).all()
    assert_matches(student, teacher, beta=0.5, labels=labels, ignore_index=7)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_rows_ignored_gives_zero(target, reduction):
    _, device = target
    student, teacher = torch.randn(4, 33, device=device), torch.randn(4, 33, device=device)
    labels = torch.full((4,), -100, device=device)
    loss, grad = run(student, teacher, beta=1.0, labels=labels, reduction=reduction)
    assert loss.item() == 0.0 and (grad == 0).all()


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("beta", [0.0, 0.5, -0.5])
def test_masked_entries(target, direction, beta):
    """-inf student entries (masked in Q too, for any beta: beta = 0 must not make 0 * -inf,
    beta < 0 must not make +inf) and -inf teacher entries. Masks are chosen so the loss stays
    finite: forward KL(Q || P) needs Q = 0 wherever P = 0, reverse KL(P || Q) needs P = 0
    wherever Q = 0."""
    _, device = target
    num_rows, vocab = shapes_for(target)[0]
    if vocab < 4:
        pytest.skip("needs a few vocabulary entries")
    student, teacher = 2 * torch.randn(num_rows, vocab), 2 * torch.randn(num_rows, vocab)
    student[:, 1::5] = float("-inf")
    if direction == "forward":
        teacher[:, 2::7] = float("-inf")  # teacher-only masks: Q = 0 there
        if beta == 0.0:
            teacher = torch.where(torch.isinf(student), float("-inf"), teacher)
    else:
        teacher[:, 1::10] = float("-inf")  # only where the student is masked too
    assert_matches(student.to(device), teacher.to(device), beta=beta, direction=direction)


def test_infinite_divergence_is_reported_as_inf_not_nan(target):
    """Q > 0 where P = 0 (forward) and P > 0 where Q = 0 (reverse) give +inf losses."""
    _, device = target
    student, teacher = torch.randn(2, 9), torch.randn(2, 9)
    student[0, 3] = float("-inf")  # forward, beta = 0: Q_3 > 0 = P_3
    teacher[1, 4] = float("-inf")  # reverse: P_4 > 0 = Q_4
    student, teacher = student.to(device), teacher.to(device)
    forward = fp.bridge_loss(student, teacher, beta=0.0, reduction="none")
    reverse = fp.bridge_loss(student, teacher, beta=0.0, direction="reverse", reduction="none")
    assert forward[0].item() == float("inf") and torch.isfinite(forward[1])
    assert reverse[1].item() == float("inf")


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_infinite_loss_has_zero_gradient(target, direction):
    """A loss of +inf (reverse: Q = 0 < P somewhere; forward, beta = 0: P = 0 < Q) is +inf for
    every nearby z_S, so its row's gradient is 0, as autograd of the reference gives, never NaN:
    a weight of 0 on such a row (dropping it) leaves the other rows' gradients as they are.
    Across several ranges of the C++ kernel's rows too (one row: its ranges split)."""
    backend, device = target
    beta = 0.0 if direction == "forward" else 0.5
    shapes = shapes_for(target) + ([] if backend == "triton" and device == "cpu" else [(1, 3 * 8192 + 5)])
    for num_rows, vocab in shapes:
        if vocab < 4:
            continue
        student, teacher = torch.randn(num_rows, vocab), torch.randn(num_rows, vocab)
        infinite = torch.arange(num_rows) % 3 == 0
        (teacher if direction == "reverse" else student)[infinite, vocab // 2] = float("-inf")
        dropped = torch.rand(num_rows) * (torch.arange(num_rows) % 2 == 1)  # row 0 (infinite) weighs 0
        for weights in (dropped, torch.ones(num_rows)):
            z = student.to(device).clone().requires_grad_()
            rows = fp.bridge_loss(z, teacher.to(device), beta=beta, direction=direction, reduction="none")
            (rows * weights.to(device)).sum().backward()
            z_ref = student.double().requires_grad_()
            want = reference.bridge_loss(z_ref, teacher.double(), beta=beta, direction=direction, reduction="none")
            (want * weights.double()).sum().backward()
            assert (rows.cpu()[infinite] == float("inf")).all() and (z.grad.cpu()[infinite] == 0).all()
            torch.testing.assert_close(rows.detach().cpu().double(), want.detach(), rtol=RTOL, atol=ATOL)
            torch.testing.assert_close(z.grad.cpu().double(), z_ref.grad,
                                       **grad_tolerance(torch.float32, z_ref.grad, student))


def test_infinite_divergence_is_decided_by_support_not_underflow(target):
    """Reverse KL(P || Q) with P_4 = e^-200 (underflows float32) and Q_4 = 0 is +inf: the
    supports decide. Forward KL(Q || P) with Q_4 = 0 there is finite."""
    _, device = target
    student, teacher = torch.randn(1, 9), torch.randn(1, 9)
    student[0, 4] = -200.0
    teacher[0, 4] = float("-inf")
    student, teacher = student.to(device), teacher.to(device)
    assert fp.bridge_loss(student, teacher, beta=0.0, direction="reverse").item() == float("inf")
    assert_matches(student, teacher, beta=0.5)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_logits_further_apart_than_float32_max_give_no_nan_and_keep_their_supports(target, direction):
    """beta = 0 is plain distillation: Q = softmax(z_T / T) whatever the student. Student logits
    3e38 and -3e38 (their difference overflows float32) gave the Triton kernel NaN bridged logits,
    0 (x - a_S) = 0 inf, so a NaN loss and gradient where the reference (and the C++ kernel) give
    row 0 loss 0 (forward: P = Q, one-hots) or +inf (reverse: P > 0 = Q at the 1.0 logit: the
    supports decide) and gradient 0. The supports are the finite logits: the Triton kernel took
    them from log2 P and log2 Q, -inf (overflowed) for logits over 2.4e38 below the row's largest,
    and gave reverse row 0 loss 0, forward row 2 (Q > 0 = P at the -1.5e38 teacher logit, 2.5e38
    below the row's largest) a finite loss, where both are +inf."""
    _, device = target
    inf = float("inf")
    student = torch.tensor([[3e38, -3e38, 1.0], [1.0, 2.0, 3.0], [1.0, -inf, 0.0]], device=device)
    teacher = torch.tensor([[0.0, -inf, -inf], [0.0, 1.0, -1.0], [1e38, -1.5e38, 0.0]], device=device)
    loss, grad = run(student, teacher, beta=0.0, direction=direction, reduction="none")
    want_loss, want_grad = expected(student, teacher, beta=0.0, direction=direction, reduction="none")
    assert loss[0].item() == (0.0 if direction == "forward" else inf)
    assert direction == "reverse" or loss[2].item() == inf
    torch.testing.assert_close(loss.cpu().double(), want_loss, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(grad.cpu().double(), want_grad, **grad_tolerance(torch.float32, want_grad, student))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("beta", [0.0, 0.5, -0.5, 2.0])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_logits_further_apart_than_float32_max_match_the_reference(target, dtype, direction, beta, temperature):
    """Rows whose logits (the student's or the teacher's) lie more than float32's largest value apart
    are finite in float64, and mostly in float32: each row's loss and gradient is the reference's
    rounded to float32 (+inf only where that overflows). The kernels formed the bridge's and the
    log-probabilities' differences in float32, where they overflow to -inf for finite logits: the
    teacher's 3e38 and -3e38 made a reverse loss +inf (Q masked where P > 0) for a reference of
    1.5e38, the student's a forward one (P masked where Q > 0), and with beta = 0.5 the student's
    made c = (z_T - r_T) + beta (z_S - r_S) = -inf at its -3e38, so a reverse loss +inf where the
    reference's is 0 (beta = 2: beta z_S overflowed to +inf, a NaN loss). Row 3 of the last pair:
    such a logit past the first block and its first range, beside ordinary rows. The C++ kernel
    computes such rows in double; the Triton kernel does not (kernels/bridge.py, Wide logits:
    fixing it there costs ordinary rows)."""
    backend, device = target
    if backend == "triton":
        pytest.skip("the Triton kernel leaves rows of logits further apart than float32's largest value as they were")
    big = torch.tensor([[3e38, -3e38, 0.0], [3e38, -3e38, 0.0], [2e38, -2e38, -1e37]])
    small = torch.tensor([[0.0, -100.0, 0.0], [0.0, -30.0, -3.0], [5.0, -80.0, 0.0]])
    ordinary, beside = 3 * torch.randn(4, 9000), 3 * torch.randn(4, 9000)
    ordinary[3, 8500] = -3e38  # (C++: kBlock = 2048, kRange = 8192)
    for student, teacher in ((small, big), (big, small), (beside, ordinary)):
        student = student.to(dtype)  # (bfloat16: the rare path reads it converted, as the others)
        loss, grad = run(student.to(device), teacher.to(device), beta=beta, temperature=temperature,
                         direction=direction, reduction="none")
        want_loss, want_grad = expected(student, teacher, beta=beta, temperature=temperature,
                                        direction=direction, reduction="none")
        # as float32 (+inf past its range)
        want_loss, want_grad = want_loss.float().double(), want_grad.float().double()
        torch.testing.assert_close(loss.cpu().double(), want_loss, rtol=RTOL, atol=ATOL)
        for n in range(len(student)):
            torch.testing.assert_close(grad[n].cpu().double(), want_grad[n],
                                       **grad_tolerance(dtype, want_grad[n], student[n], temperature))


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_row_without_a_distribution_gives_nan(target, direction):
    """A row whose student logits (so P_S) or bridge logits (so Q) are all -inf has no loss:
    NaN loss and gradient in that row only, found without a host synchronisation; ignored,
    such a row gives 0 like any other."""
    _, device = target
    student, teacher = torch.randn(4, 9), torch.randn(4, 9)
    student[0] = float("-inf")  # no P_S
    teacher[1] = float("-inf")  # no Q (beta = 0.5: Q is P_T P_S^beta)
    student[3] = float("-inf")  # no P_S either, but ignored
    student, teacher = student.to(device), teacher.to(device)
    labels = torch.tensor([1, 1, 1, -100], device=device)
    loss, grad = run(student, teacher, beta=0.5, direction=direction, labels=labels, reduction="none")
    assert loss[:2].isnan().all() and loss[2].isfinite() and loss[3].item() == 0.0
    assert grad[:2].isnan().all() and grad[2].isfinite().all() and (grad[3] == 0).all()
    want_loss, _ = expected(student, teacher, beta=0.5, direction=direction, labels=labels, reduction="none")
    torch.testing.assert_close(loss.cpu().double(), want_loss, rtol=RTOL, atol=ATOL, equal_nan=True)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_nan_or_inf_input_gives_a_nan_loss(target, direction):
    """A NaN or +inf logit (student or teacher) makes its row's loss NaN in every backend and in
    the reference (whose 0 log 0 = 0 guard must not read NaN as an empty entry), never 0, and
    its whole gradient row NaN, as the reference's autograd: entries the student masks too (the
    reverse kernels gave them 0, and a teacher's +inf gave +-inf elsewhere in its row)."""
    _, device = target
    student, teacher = torch.randn(6, 9), torch.randn(6, 9)
    student[0, 3], teacher[1, 5], student[2, 0], teacher[3, 2] = float("nan"), float("nan"), float("inf"), float("inf")
    student[1, 1] = student[3, 4] = student[5, 6] = float("-inf")  # masked entries, in NaN rows and in a finite one
    loss, grad = run(student.to(device), teacher.to(device), beta=0.5, direction=direction, reduction="none")
    want, want_grad = expected(student, teacher, beta=0.5, direction=direction, reduction="none")
    assert loss[:4].isnan().all() and want[:4].isnan().all()
    assert grad[:4].isnan().all() and want_grad[:4].isnan().all()
    torch.testing.assert_close(loss[4:].cpu().double(), want[4:], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(grad[4:].cpu().double(), want_grad[4:], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_equal_distributions_give_no_negative_loss(target, direction):
    """A student equal to its teacher (beta = 0: Q = P_S): every row's loss is >= 0 and about 0,
    never the -2e-7 to -5e-7 that rounding leaves without the clamp at 0."""
    _, device = target
    student = (torch.randn(600, 1000) * 4).to(device)
    rows = fp.bridge_loss(student, student.clone(), beta=0.0, direction=direction, reduction="none")
    assert (rows >= 0).all() and (rows <= 1e-5).all()


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_near_equal_distributions_keep_the_loss_relative_precision(target, direction):
    """Plain distillation (beta = 0) of a teacher 1e-3 * randn from the student (a KL of ~5e-7): the
    loss's median relative error over 16 rows of 16384 under 3e-2 (C++: 3.6e-3 to 1.2e-2 either way
    over 20 draws). KL(A || B) sums A~ (ln A~ - ln B~) - A~ + B~ over the exps A~, B~ of the
    log-probabilities as formed (the reverse divides by sum P~), which cancels the log-sum-exps'
    rounding and is second order in each log-probability's: summed as A ln(A / B) alone (forward)
    the median was 6.7e-2 to 0.4, formed centred (reverse) 8e-2 to 0.22. (What is left is each
    exp's own rounding, ~1e-7 of A's largest entries: a row whose mass sits on a few tokens can
    still be 0.2 off.)"""
    _, device = target
    student = 3 * torch.randn(16, 16384)
    teacher = student + 1e-3 * torch.randn(16, 16384)
    kwargs = dict(beta=0.0, direction=direction, reduction="none")
    got = fp.bridge_loss(student.to(device), teacher.to(device), **kwargs).cpu().double()
    want = reference.bridge_loss(student.double(), teacher.double(), **kwargs)
    assert ((got - want).abs() / want).median() < 3e-2


def test_labels_of_any_integer_dtype(target):
    """int32 (or uint8) labels give the int64 labels' loss and gradient, bit for bit."""
    _, device = target
    student, teacher = torch.randn(7, 33, device=device), torch.randn(7, 33, device=device)
    labels = torch.tensor([3, -100, 5, 0, -100, 1, 2], device=device)
    want = run(student, teacher, beta=0.5, labels=labels)
    for dtype in (torch.int32, torch.int16):
        got = run(student, teacher, beta=0.5, labels=labels.to(dtype))
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    kept = torch.tensor([1, 0, 1, 1, 0, 1, 1], dtype=torch.uint8, device=device) * 7
    got = run(student, teacher, beta=0.5, labels=kept, ignore_index=0)
    assert torch.equal(got[1][1], torch.zeros(33, device=device)) and got[1][0].abs().sum() > 0


def test_extreme_logits(target):
    """Logits of magnitude 1e4: no overflow or NaN, and results as accurate as float32 allows."""
    _, device = target
    num_rows, vocab = shapes_for(target)[0]
    student = 1e4 * torch.randn(num_rows, vocab, device=device)
    teacher = 1e4 * torch.randn(num_rows, vocab, device=device)
    teacher[:, 0] = student.amax(-1) + 0.5  # keep some rows from being disjoint one-hots
    for direction in ("forward", "reverse"):
        loss, grad = run(student, teacher, beta=1.0, direction=direction, reduction="sum")
        want_rows = reference.bridge_loss(student.double(), teacher.double(), beta=1.0, direction=direction,
                                          reduction="none").cpu()
        want_loss, want_grad = expected(student, teacher, beta=1.0, direction=direction, reduction="sum")
        torch.testing.assert_close(loss.cpu().double(), want_loss, rtol=1e-4, atol=1e-4)
        # float32 limits, not the kernel: z_T + beta z_S near 2e4 is known to ~2e-3 (its ulp),
        # which moves near-tied probabilities by up to ~1%. The reverse gradient P (g - KL) has g
        # and KL up to ~1e4 here: the kernels form it centred (as g - g_a, see
        # test_large_divergence_keeps_float32_precision), the reference's autograd not, so
        # it is off by a few float64 ulps of the KL (rows whose P and Q are one-hots at one token
        # have a gradient of that size only)
        scale = want_grad.abs().max().item()
        cancellation = 8 * 2.0**-52 * want_rows.abs().max().item()
        torch.testing.assert_close(grad.cpu().double(), want_grad, rtol=1e-2, atol=1e-2 * scale + cancellation)


def first_block_width(target) -> int:
    """The widest first vocabulary block a backend's kernel may take: outliers past it lie
    outside every first block (C++: kBlock; Triton: the interpreter's block, or the largest
    autotuned one on a GPU)."""
    backend, device = target
    if backend == "cpp":
        return 2048
    from fastprobe.kernels import bridge as triton_bridge

    if device == "cpu":
        return triton_bridge._INTERPRET_BLOCK_V
    return max(config.kwargs["BLOCK_V"] for config in triton_bridge._AUTOTUNE_CONFIGS)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("beta", [-2.0, -1.0, -0.5, 0.5, 2.0])
def test_outlier_rows_keep_float32_precision(target, direction, beta):
    """Q's mass sits where z_T + beta z_S is largest: with beta < 0 on the student's lowest logits
    (~-1e4), far from its largest ones; with any beta on outliers past the first vocabulary block.
    The kernels form the bridge relative to an anchor token near that maximum (re-anchoring
    after pass 1 when it is far), so near-tied outliers keep float32 precision: the gradient is
    as accurate as for ordinary rows (taken relative to the first block's maxima it was off by
    up to 3e-4 in C++, 5e-4 in Triton; the reverse one is formed centred at the student's top
    token: test_large_divergence_keeps_float32_precision). Two blocks and a ragged third.
    Rows: outliers near-tied (spread 0.01) anywhere; on both sides of the student; with -inf
    entries; only past the first block; in the teacher too."""
    _, device = target
    block = first_block_width(target)
    vocab = 2 * block + 301
    student, teacher = torch.randn(5, vocab), torch.randn(5, vocab)
    side = 1.0 if beta > 0 else -1.0  # (where the bridge's weight goes)
    anywhere, late = torch.randperm(vocab)[:8], block + torch.randperm(vocab - block)[:8]
    student[0, anywhere] = side * (1e4 + 0.01 * torch.randn(8))
    student[1, anywhere[:4]], student[1, anywhere[4:]] = 1e4 + torch.randn(4), -1e4 + torch.randn(4)
    student[2, anywhere] = side * (1e4 + torch.randn(8))
    student[2, anywhere[0]], teacher[2, anywhere[1]], student[2, 5] = float("-inf"), float("-inf"), float("-inf")
    student[3, late] = side * (1e4 + 0.01 * torch.randn(8))
    student[4, late], teacher[4, late] = side * (1e4 + torch.randn(8)), 1e4 + torch.randn(8)
    student, teacher = student.to(device), teacher.to(device)
    kwargs = dict(beta=beta, direction=direction, reduction="none")
    loss, grad = run(student, teacher, **kwargs)
    loss, grad = loss.cpu(), grad.cpu()
    want_loss, want_grad = expected(student, teacher, **kwargs)
    finite = want_loss.isfinite()  # (reverse: row 2's Q masks a token its P keeps)
    torch.testing.assert_close(loss.double()[finite], want_loss[finite], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(grad.double(), want_grad, **grad_tolerance(torch.float32, want_grad, student))



@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_outliers_many_temperatures_up_are_re_anchored(direction):
    """The C++ kernel re-anchors a row whose largest bridge logit is over 64 temperatures above its
    first block's, not 64 logits: at T = 0.02 outliers 40 above it (2000 T) are near-tied only at
    T's scale, and rounding their bridge logits at the old anchor (an error of ~1e-6 / T in log Q)
    put 1.5e-4 relative into the loss."""
    temperature, vocab = 0.02, 2 * 2048 + 301
    student, teacher = torch.randn(2, vocab), torch.randn(2, vocab)
    late = 2048 + torch.randperm(vocab - 2048)[:8]
    student[:, late] = 40.0 + temperature * torch.randn(2, 8)
    teacher[:, late] = 40.0 + temperature * torch.randn(2, 8)
    kwargs = dict(beta=0.5, direction=direction, reduction="none", temperature=temperature)
    with fp.use_backend("cpp"):
        loss, grad = run(student, teacher, **kwargs)
    want_loss, want_grad = expected(student, teacher, **kwargs)
    torch.testing.assert_close(loss.double(), want_loss, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(grad.double(), want_grad, **grad_tolerance(torch.float32, want_grad, student, temperature))


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("beta", [-2.0, -0.5])
def test_large_divergence_keeps_float32_precision(target, beta, direction):
    """KL of ~1e4: with beta < 0 Q's mass sits on the student's lowest logits (~-1e4), far from P's,
    so log P - log Q and the loss are ~1e4 wherever P (or Q) has mass. Reverse, the kernels centre
    g = log P - log Q at the student's top token (g - g_a is a difference of nearby logits there),
    so the gradient P (g - KL) / T is as accurate as for ordinary rows (formed from g and the KL in
    float32 it was off by up to 2e-3, 1e-4 on most such rows). The loss is within a few float32
    roundings of its value, 2^-21 (C++, 300 draws: reverse up to 4.0 x 2^-24; forward, 60 draws,
    3.9 x 2^-24 whatever the vector width, since its block sums are double: in float32 runs of 512
    terms it was 7.6 x 2^-24 at 16 lanes, 24.7 at 4 (baseline x86-64) and 92 in the sanitizer's
    build). Rows: outliers anywhere; the student's top past the first vocabulary block, far
    above it (the reverse centre moves there); near-tied outliers; the teacher's outliers; the
    student's top past the first block with the teacher high there too; a first block the student
    masks whole."""
    _, device = target
    block = first_block_width(target)
    vocab = 2 * block + 301
    student, teacher = torch.randn(6, vocab), torch.randn(6, vocab)
    anywhere, late = torch.randperm(vocab)[:8], block + torch.randperm(vocab - block)[:8]
    student[0, anywhere] = -(1e4 + torch.randn(8))
    student[1, late[:4]], student[1, late[4:]] = 1e4 + torch.randn(4), -1e4 + torch.randn(4)
    student[2] *= 3
    student[2, anywhere] = -(1e4 + 0.01 * torch.randn(8))
    teacher[3, anywhere] = 1e4 + torch.randn(8)
    student[4, late[:4]], teacher[4, late[:4]], student[4, late[4:]] = 1e4 + torch.randn(4), 5e3, -1e4
    student[5, :block], student[5, late] = float("-inf"), -(1e4 + torch.randn(8))
    student, teacher = student.to(device), teacher.to(device)
    kwargs = dict(beta=beta, direction=direction, reduction="none")
    loss, grad = run(student, teacher, **kwargs)
    want_loss, want_grad = expected(student, teacher, **kwargs)
    # (forward row 3: Q on the teacher's outliers, where P is ~1 / V: ~log V)
    assert (want_loss > 1e3).sum() >= (6 if direction == "reverse" else 5)
    torch.testing.assert_close(loss.cpu().double(), want_loss, rtol=2.0**-21, atol=ATOL)
    for row in range(len(student)):  # (each row to its own gradient's scale: row 3's is ~50 times the others')
        tolerance = grad_tolerance(torch.float32, want_grad[row], student[row])
        torch.testing.assert_close(grad[row].cpu().double(), want_grad[row], **tolerance)


@pytest.mark.parametrize("beta", [2.0, 0.37, -0.5])
def test_reverse_loss_is_formed_where_p_has_mass(target, beta):
    """Reverse: the kernels form the loss as g_a + sum_v P_v (g_v - g_a) at a centre token a.
    Where g_a is far from the loss (a teacher logit far below a's), the roundings of g_v - g_a
    and the float32 log-sum-exp's relative error (which scales P against log P) reached the loss
    multiplied by |g_a|: centred at the first block's top student logit, with P's sum taken as 1,
    the loss was off by up to 6e-3 on rows of kind 1, 6e-4 (of 0.65) on kind 2 (and 6e-5 on 3
    randn rows with beta = 2 where a block was summed in order). Rows: (1) the first block's top
    student logit 20 below the row's, the teacher 1e4 below there; (2) near-uniform student and
    teacher (as at the start of distillation), the student's top logit in the first block, the
    teacher 1e3 below there."""
    _, device = target
    block = first_block_width(target)
    vocab, rows = 2 * block + 3, torch.arange(4)
    student, teacher = 3 * torch.randn(8, vocab), 3 * torch.randn(8, vocab)
    student[:4, :block] -= 20
    teacher[rows, student[:4, :block].argmax(-1)] = -1e4
    student[4:], teacher[4:] = 0.1 * torch.randn(4, vocab), 0.1 * torch.randn(4, vocab)
    student[4:, 5] = student[4:].max(-1).values + 0.05
    teacher[4:, 5] = -1e3
    student, teacher = student.to(device), teacher.to(device)
    assert_matches(student, teacher, beta=beta, temperature=0.7, direction="reverse", reduction="none")


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("beta", [0.0, 0.37, -0.5])
def test_tiny_temperatures_keep_the_loss(target, direction, beta):
    """At a small temperature a bridge logit's own float32 rounding (~2^-24 of it) is many T:
    log Q~ must come from the very logits pass 1 took Q's log-sum-exp of, so that Q's top entry
    is 1 / sum. Reverse, centred at the student's top token a (z_T,v - z_T,a + beta (z_S,v -
    z_S,a), rounded otherwise) with only log Q's shift moved, Q's top entry was e^(+-2^-24 c / T),
    0 (Delta / M = -1: a loss of -inf, clamped to 0) or inf: over 10 draws, beta 0.37 and -0.5,
    28 and 26 of 320 two-token rows and 8 and 7 of 80 rows of 301 at T = 1e-10, 12 and 15 of 80
    rows of 1e4 * randn at T = 1e-5 gave 0 for losses of ~1e9-1e10 (C++, at bfe13b7). Allowed:
    rounding z_T + beta z_S in float32 (a few 2^-24 of it, over T: near-tied bridge logits make
    that a large part of the loss)."""
    _, device = target
    cases = [(3 * torch.randn(32, 2), 3 * torch.randn(32, 2), 1e-10),
             (3 * torch.randn(8, 301), 3 * torch.randn(8, 301), 1e-10),
             (1e4 * torch.randn(8, 301), 1e4 * torch.randn(8, 301), 1e-5)]
    for student, teacher, temperature in cases:
        kwargs = dict(beta=beta, temperature=temperature, direction=direction, reduction="none")
        loss, grad = run(student.to(device), teacher.to(device), **kwargs)
        want_loss, want_grad = expected(student, teacher, **kwargs)
        bridge_rounding = 2.0**-21 * (teacher.abs() + abs(beta) * student.abs()).max().item() / temperature
        torch.testing.assert_close(loss.cpu().double(), want_loss, rtol=RTOL, atol=bridge_rounding)
        tolerance = grad_tolerance(torch.float32, want_grad, student, temperature)
        torch.testing.assert_close(grad.cpu().double(), want_grad, **tolerance)


def test_non_contiguous_and_leading_dims(target):
    _, device = target
    num_rows, vocab = shapes_for(target)[0]
    student = torch.randn(2 * vocab, num_rows, device=device).t()[:, ::2]  # [N, V], no unit stride
    teacher = torch.randn(num_rows, 3, vocab, device=device)[:, 1]
    assert not student.is_contiguous() and not teacher.is_contiguous()
    # the C++ kernel reads rows of unit vocabulary stride in place and converts others (the
    # teacher's here): both ways round
    assert_matches(student, teacher, beta=0.37, temperature=1.3)
    assert_matches(teacher, student, beta=0.37, temperature=1.3)
    # [B, L, V] logits with [B, L] labels: "none" keeps the leading shape
    batch = torch.randn(2, 3, 17, device=device)
    per_row = fp.bridge_loss(batch, torch.randn(2, 3, 17, device=device), beta=0.5, reduction="none",
                             labels=torch.zeros(2, 3, dtype=torch.long, device=device))
    assert per_row.shape == (2, 3)


# ---------------------------------------------------------------- mixed dtypes

# (student dtype, teacher dtype): every ordered pair of two different kernel dtypes
MIXED_DTYPES = [(s, t) for s in DTYPES for t in DTYPES if s != t]


def mixed_inputs(target, student_dtype, teacher_dtype):
    """Odd shapes, -inf masked entries (where the student masks, the teacher does too: finite
    losses either direction), and strided inputs (the student a transposed buffer's rows, the
    teacher a slice of [N, 3, V]) in their two dtypes."""
    _, device = target
    num_rows, vocab = shapes_for(target)[0]
    student, teacher = 3 * torch.randn(num_rows, vocab), 3 * torch.randn(num_rows, vocab)
    masked = torch.rand(num_rows, vocab) < 0.1
    masked[:, 0] = False  # (every row keeps a token)
    student[masked] = teacher[masked] = float("-inf")
    strided_student = torch.empty(vocab, num_rows, dtype=student_dtype, device=device).t()
    strided_student.copy_(student)
    strided_teacher = torch.empty(num_rows, 3, vocab, dtype=teacher_dtype, device=device)[:, 1]
    strided_teacher.copy_(teacher)
    return strided_student, strided_teacher


@pytest.mark.parametrize("student_dtype, teacher_dtype", MIXED_DTYPES, ids=str)
@pytest.mark.parametrize("direction, beta", [("forward", 0.0), ("forward", 0.37), ("reverse", 0.5), ("reverse", -0.5)])
def test_mixed_dtypes_match_reference(target, student_dtype, teacher_dtype, direction, beta):
    """Student and teacher logits of different dtypes (a bfloat16 student under autocast, a float32
    teacher, ...) are each read in their own dtype: the loss (float32) and the gradient (in the
    student's dtype) match the float64 reference on the same values, forward and reverse, with
    masked entries, strided inputs and ignored rows. (They were refused: a TypeError.)"""
    student, teacher = mixed_inputs(target, student_dtype, teacher_dtype)
    assert not student.is_contiguous() and not teacher.is_contiguous()
    labels = random_labels(student.shape[0], student.device)
    for reduction in ("none", "mean"):
        assert_matches(student, teacher, beta=beta, temperature=0.8, direction=direction, labels=labels,
                       reduction=reduction)


@pytest.mark.parametrize("student_dtype, teacher_dtype", MIXED_DTYPES, ids=str)
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_mixed_dtypes_give_the_bits_of_the_call_cast_up_beforehand(target, student_dtype, teacher_dtype, direction,
                                                                   monkeypatch):
    """The kernels convert each input to float32 exactly, so a mixed call gives the bits of the
    call with both inputs cast to their common dtype (torch.promote_types: the wider, float32 for
    bfloat16 with float16) beforehand: the same loss, and that call's gradient rounded to the
    student's dtype. (Untuned on a GPU: another block size would sum in another order.)
    The Triton interpreter rounds float32 to bfloat16 toward zero (the GPU and C++ to nearest
    even): there the cast call's gradient is truncated likewise."""
    backend, device = target
    monkeypatch.setenv("FASTPROBE_AUTOTUNE", "0")
    student, teacher = mixed_inputs(target, student_dtype, teacher_dtype)
    common = torch.promote_types(student_dtype, teacher_dtype)
    labels = random_labels(student.shape[0], student.device)
    kwargs = dict(beta=0.37 if direction == "forward" else -0.5, temperature=0.8, direction=direction,
                  labels=labels, reduction="none")
    loss, grad = run(student, teacher, **kwargs)
    cast_loss, cast_grad = run(student.to(common), teacher.to(common), **kwargs)
    assert loss.dtype == torch.float32 and grad.dtype == student_dtype
    assert torch.isfinite(loss).all() and not grad.isnan().any()
    assert torch.equal(loss, cast_loss)
    if backend == "triton" and device == "cpu" and student_dtype == torch.bfloat16:
        cast_grad = (cast_grad.float().view(torch.int32) & -65536).view(torch.float32)  # (toward zero)
    assert torch.equal(grad, cast_grad.to(student_dtype))


FLOAT64_MIXES = [(torch.float64, torch.float32), (torch.float32, torch.float64), (torch.float64, torch.bfloat16),
                 (torch.float16, torch.float64)]


@pytest.mark.parametrize("student_dtype, teacher_dtype", FLOAT64_MIXES, ids=str)
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_float64_with_another_dtype_runs_the_reference_in_float64(student_dtype, teacher_dtype, direction):
    """A float64 input with another dtype runs the reference in float64: the loss is float64 and
    exact to float64 precision, the gradient in the student's dtype (the float64 one rounded).
    A forced fast backend refuses it (the fast kernels take no float64)."""
    student, teacher = mixed_inputs(("cpp", "cpu"), student_dtype, teacher_dtype)
    kwargs = dict(beta=0.37, temperature=0.8, direction=direction, reduction="none")
    loss, grad = run(student, teacher, **kwargs)
    want_loss, want_grad = expected(student, teacher, **kwargs)
    assert loss.dtype == torch.float64 and grad.dtype == student_dtype
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-12)
    if student_dtype == torch.float64:
        torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-12)
    else:  # (rounded once from float64)
        eps = torch.finfo(student_dtype).eps
        torch.testing.assert_close(grad.double(), want_grad, rtol=eps, atol=eps * want_grad.abs().max().item())
    fp.set_backend("cpp")
    with pytest.raises(RuntimeError, match="float64"):
        fp.bridge_loss(student, teacher, beta=0.37)


def test_torch_compile_fullgraph_takes_mixed_dtypes():
    """Under fullgraph compile the op's fake kernel gives the mixed call's dtypes (a float32 loss,
    a bfloat16 gradient for a bfloat16 student, float64 with a float64 teacher), and the compiled
    step matches eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    labels = torch.tensor([0, 1, -100, 2, 3, 4])
    loss_fn = fp.BridgeLoss(beta=0.5, temperature=0.9)

    def step(z, t):
        return loss_fn(z, t, labels=labels) * 2

    for student_dtype, teacher_dtype in ((torch.bfloat16, torch.float32), (torch.float32, torch.float16),
                                         (torch.float32, torch.float64)):
        student = torch.randn(6, 130).to(student_dtype)
        teacher = torch.randn(6, 130).to(teacher_dtype)
        counter = CompileCounterWithBackend("inductor")
        compiled = torch.compile(step, backend=counter, fullgraph=True)
        z1, z2 = student.clone().requires_grad_(), student.clone().requires_grad_()
        got, want = compiled(z1, teacher), step(z2, teacher)
        got.backward()
        want.backward()
        assert counter.frame_count == 1 and got.dtype == want.dtype == torch.promote_types(teacher_dtype, torch.float32)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        assert z1.grad.dtype == student_dtype
        torch.testing.assert_close(z1.grad, z2.grad, rtol=1e-6, atol=1e-7)


def test_triton_launcher_tunes_each_dtype_pair_apart(monkeypatch):
    """The launcher keeps the config Triton's autotuner chose per key, and that autotuner keys on
    the dtype of each tensor argument: the key names the teacher's dtype too, so a mixed pair
    never takes the config tuned for another pair. (No kernel runs: the launch is recorded.)"""
    from fastprobe.kernels import bridge as triton_bridge

    keys = []
    monkeypatch.setattr(triton_bridge, "interpreter_enabled", lambda: False)
    monkeypatch.setattr(triton_bridge, "autotune_enabled", lambda: True)
    monkeypatch.setattr(triton_bridge, "launch_tuned", lambda *args: keys.append(args[-1]))
    student = torch.randn(2, 40, dtype=torch.bfloat16)
    for teacher_dtype in DTYPES:
        triton_bridge.bridge_loss(student, torch.randn(2, 40, dtype=teacher_dtype), None, -100, 0.5, 1.0, False,
                                  torch.empty(2), None)
    assert len(set(keys)) == len(DTYPES)


def test_inputs_untouched_and_teacher_gets_no_gradient(target):
    _, device = target
    student = torch.randn(5, 40, device=device, requires_grad=True)
    teacher = torch.randn(5, 40, device=device, requires_grad=True)
    copies = student.detach().clone(), teacher.detach().clone()
    fp.bridge_loss(student, teacher, beta=1.0).backward()
    assert torch.equal(student.detach(), copies[0]) and torch.equal(teacher.detach(), copies[1])
    assert teacher.grad is None and student.grad is not None


def test_second_backward_through_one_loss():
    student = torch.randn(4, 30, requires_grad=True)
    loss = fp.bridge_loss(student, torch.randn(4, 30), beta=0.5)
    (first,) = torch.autograd.grad(loss, student, retain_graph=True)
    (second,) = torch.autograd.grad(3 * loss, student)
    torch.testing.assert_close(second, 3 * first)


class VocabularySized(TorchDispatchMode):
    """Records the storages of the tensors of one shape that the ops run under it return."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.storages = tuple(shape), set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for tensor in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(tensor, torch.Tensor) and tuple(tensor.shape) == self.shape:
                self.storages.add(tensor.untyped_storage().data_ptr())
        return result


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_backward_makes_one_vocabulary_sized_tensor(reduction):
    """The backward's only [N, V] allocation is the gradient it returns: the op's gradient
    buffer, an output no loss differentiates, must not be handed a zero-filled [N, V] gradient."""
    num_rows, vocab = 6, 53

    student = torch.randn(num_rows, vocab, requires_grad=True)
    loss = fp.bridge_loss(student, torch.randn(num_rows, vocab), beta=0.5, reduction=reduction)
    with VocabularySized((num_rows, vocab)) as made:
        (grad,) = torch.autograd.grad(loss.sum(), student)
    assert made.storages == {grad.untyped_storage().data_ptr()}


def test_backward_scales_the_buffer_in_place_unless_the_graph_is_kept():
    """With the graph freed after the backward, the gradient returned is the op's own buffer,
    scaled in place (no second [N, V] tensor); with retain_graph it is a new tensor and the
    buffer stays intact for the second backward. torch 2.4 cannot tell: always a new tensor."""
    num_rows, vocab = 6, 53

    student, teacher = torch.randn(num_rows, vocab, requires_grad=True), torch.randn(num_rows, vocab)
    can_tell = hasattr(torch._C._autograd, "_get_current_graph_task_keep_graph")
    with VocabularySized((num_rows, vocab)) as made:
        loss = fp.bridge_loss(student, teacher, beta=0.5)
    (grad,) = torch.autograd.grad(loss, student)
    assert (grad.untyped_storage().data_ptr() in made.storages) == can_tell
    want = expected(student, teacher, beta=0.5)[1]
    torch.testing.assert_close(grad.double(), want, **grad_tolerance(torch.float32, want, student))

    with VocabularySized((num_rows, vocab)) as made:
        loss = fp.bridge_loss(student, teacher, beta=0.5)
    (first,) = torch.autograd.grad(loss, student, retain_graph=True)
    assert first.untyped_storage().data_ptr() not in made.storages
    (second,) = torch.autograd.grad(2 * loss, student)
    torch.testing.assert_close(second, 2 * first)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_per_row_incoming_gradients(target, dtype, monkeypatch):
    """reduction="none" with a different incoming gradient per row (no shared factor; 16-bit
    gradients on the CPU are scaled a few rows at a time: 7 here, so the rows end mid-chunk)."""
    from fastprobe.ops import bridge as bridge_ops

    monkeypatch.setattr(bridge_ops, "_SCALE_ROWS_CHUNK", 7)
    _, device = target
    num_rows, vocab = shapes_for(target)[0]
    student = (3 * torch.randn(num_rows, vocab)).to(device=device, dtype=dtype)
    teacher = (3 * torch.randn(num_rows, vocab)).to(device=device, dtype=dtype)
    weights = torch.randn(num_rows, device=device)
    z = student.clone().requires_grad_()
    (fp.bridge_loss(z, teacher, beta=0.37, reduction="none") * weights).sum().backward()
    want_z = student.double().requires_grad_()
    (reference.bridge_loss(want_z, teacher.double(), beta=0.37, reduction="none") * weights.double()).sum().backward()
    want = want_z.grad.cpu()
    torch.testing.assert_close(z.grad.cpu().double(), want, **grad_tolerance(dtype, want, student))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_few_rows_split_the_work_and_keep_their_bits(dtype, direction):
    """With fewer rows than threads (or fewer than twice as many, not a multiple of them) the C++
    kernel spreads each row's vocabulary ranges (8192 logits, their log-sum-exps and loss shares
    merged in a fixed order) over the threads: a row's loss and gradient are the same bits alone,
    in a batch and under any thread count, and match the reference. Four ranges, the last short; one row is ignored (zero gradient in every range),
    one has a range masked in both models, one has logits ~1e4; float16 rows are strided."""
    from fastprobe.ops.bridge import _bridge_loss_op

    num_rows, vocab = 5, 3 * 8192 + 777
    generator = torch.Generator().manual_seed(1)
    student, teacher = (3 * torch.randn(num_rows, vocab, generator=generator) for _ in range(2))
    student[1, 8192:16384] = teacher[1, 8192:16384] = float("-inf")
    student[3] *= 3e3
    teacher[3] = student[3] + torch.randn(vocab, generator=generator)
    masked = torch.rand(student.shape, generator=generator) < 0.05
    student[masked] = teacher[masked] = float("-inf")
    if dtype == torch.float16:  # (logits ~1e4 stay inside float16's range)
        student = student.t().contiguous().t()
    student, teacher = student.to(dtype), teacher.to(dtype)
    labels = torch.tensor([0, 1, -100, 3, 4])
    reverse = direction == "reverse"
    whole = same_bits_per_row(
        lambda rows: _bridge_loss_op(student[rows], teacher[rows], labels[rows], -100, beta_tensor(0.37), 1 / 0.8, reverse,
                                     True),
        num_rows)
    assert whole[0][2] == 0 and torch.equal(whole[1][2], torch.zeros(vocab, dtype=dtype))
    kwargs = dict(beta=0.37, temperature=0.8, direction=direction, labels=labels, reduction="none")
    want_loss, want_grad = expected(student, teacher, **kwargs)
    torch.testing.assert_close(whole[0].double(), want_loss, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(whole[1].double(), want_grad, **grad_tolerance(dtype, want_grad, student, 0.8))


def test_zero_rows_have_an_empty_gradient():
    student = torch.randn(0, 9, requires_grad=True)
    loss = fp.bridge_loss(student, torch.randn(0, 9), beta=0.5)
    loss.backward()
    assert loss.item() == 0.0 and student.grad.shape == (0, 9)


def test_no_gradient_without_requires_grad():
    student, teacher = torch.randn(4, 30), torch.randn(4, 30)
    loss = fp.bridge_loss(student, teacher, beta=0.5)
    assert loss.grad_fn is None
    with torch.no_grad():
        assert fp.bridge_loss(student.requires_grad_(), teacher, beta=0.5).grad_fn is None


def test_gradcheck_float64():
    """float64 runs the reference formulas inside the op: check its autograd wiring. beta = 0
    only: with beta != 0, Q depends on z_S and the stop-gradient makes the analytic gradient
    differ from finite differences by design."""
    student = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 7, dtype=torch.float64)
    labels = torch.tensor([1, -100, 2])
    for direction in ("forward", "reverse"):
        for reduction in ("mean", "none"):
            def loss(z):
                return fp.bridge_loss(z, teacher, beta=0.0, temperature=0.8, direction=direction,
                                      labels=labels, reduction=reduction)
            assert torch.autograd.gradcheck(loss, (student,), eps=1e-6, atol=1e-6)


def test_torch_compile_fullgraph_takes_beta_at_run_time():
    """Under fullgraph compile, with beta changing between calls as a schedule changes it: beta
    is a runtime value, so the second value recompiles once and every later one reuses that
    graph. (Handed to the op as a Python float it was specialized: one graph per value, and
    fullgraph=True failed at torch's recompile limit, the 9th value.)"""
    from torch._dynamo.testing import CompileCounterWithBackend

    student, teacher = torch.randn(6, 130), torch.randn(6, 130)
    labels = torch.tensor([0, 1, -100, 2, 3, 4])
    loss_fn = fp.BridgeLoss(beta_start=0.0, beta_end=1.0, total_steps=10, temperature=0.9)

    def step(z, t, step):
        return loss_fn(z, t, labels=labels, step=step) * 2

    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    for at in range(10):
        z1, z2 = student.clone().requires_grad_(), student.clone().requires_grad_()
        compiled(z1, teacher, at).backward()
        step(z2, teacher, at).backward()
        torch.testing.assert_close(z1.grad, z2.grad, rtol=1e-6, atol=1e-7)
        if at == SCHEDULE_COMPILES - 1:
            settled = counter.frame_count
    assert counter.frame_count == settled <= SCHEDULE_COMPILES  # every later beta reused the last graph
    # the op reads beta on the host: a CUDA graph must not capture it (a replay would keep the captured beta)
    if hasattr(torch.Tag, "cudagraph_unsafe"):
        assert torch.Tag.cudagraph_unsafe in torch.ops.fastprobe.bridge_loss.default.tags


def test_fused_linear_under_torch_compile_takes_beta_at_run_time():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(0)
    hidden, weight, teacher_hidden, teacher_weight = torch.randn(6, 8), torch.randn(17, 8), torch.randn(6, 8), torch.randn(17, 8)
    loss_fn = fp.FusedLinearBridgeLoss(beta_start=0.0, beta_end=1.0, total_steps=10, chunk_rows=4)

    def step(weight, at):
        return loss_fn(hidden, weight, teacher_hidden, teacher_weight, step=at)

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    for at in range(10):
        w1, w2 = weight.clone().requires_grad_(), weight.clone().requires_grad_()
        compiled(w1, at).backward()
        step(w2, at).backward()
        torch.testing.assert_close(w1.grad, w2.grad)
        if at == SCHEDULE_COMPILES - 1:
            settled = counter.frame_count
    assert counter.frame_count == settled <= SCHEDULE_COMPILES  # every later beta reused the last graph


@pytest.mark.parametrize("form", ["fused-linear", "bfloat16-rows"])
def test_torch_compile_keeps_the_row_count_symbolic(form):
    """Compiled with dynamic=True, a loss over batches of changing token counts is one graph: the
    fused-linear form's chunk loop (range(0, N, chunk_rows)) and the CPU 16-bit per-row gradient's
    chunk loop made torch.compile specialize N, a graph per count (fullgraph: an error at the
    recompile limit)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(0)
    if form == "fused-linear":
        loss_fn, teacher_weight = fp.FusedLinearBridgeLoss(beta=0.5), torch.randn(37, 16)

        def step(student, teacher, row_weights):
            return loss_fn(student, teacher_weight, teacher, teacher_weight)
    else:
        def step(student, teacher, row_weights):
            return (fp.bridge_loss(student, teacher, beta=0.5, reduction="none") * row_weights).sum()

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, fullgraph=True, dynamic=True)
    for rows in (5, 7, 9, 12, 70, 130):
        width = 16 if form == "fused-linear" else 37
        student = torch.randn(rows, width)
        teacher, row_weights = torch.randn(rows, width), torch.rand(rows)
        if form != "fused-linear":
            student, teacher = student.bfloat16(), teacher.bfloat16()
        got, want = student.clone().requires_grad_(), student.clone().requires_grad_()
        compiled(got, teacher, row_weights).backward()
        step(want, teacher, row_weights).backward()
        torch.testing.assert_close(got.grad, want.grad)
    assert counter.frame_count <= 2


def test_frozen_student_gives_the_teacher_no_gradient():
    """teacher_logits take no gradient: a loss of a frozen student and a teacher that carries a
    graph has none (backward of it alone is torch's own error), and in a sum with a teacher
    loss the teacher gets only that loss's gradient."""
    student, teacher = torch.randn(3, 17), torch.randn(3, 17, requires_grad=True)
    loss = fp.bridge_loss(student, teacher, beta=0.5)
    assert not loss.requires_grad
    (loss + teacher.square().sum()).backward()
    torch.testing.assert_close(teacher.grad, 2 * teacher.detach())


def test_the_op_checks_what_its_kernels_read():
    """torch.ops.fastprobe.bridge_loss is reachable past bridge_loss's checks: teacher and
    labels that do not match the student are refused before any kernel reads them."""
    from fastprobe.ops.bridge import _bridge_loss_op

    student = torch.randn(4, 31)
    for teacher, labels in ((torch.ones(4, 31, dtype=torch.int32), None), (torch.randn(2, 31), None),
                            (torch.randn(4, 31), torch.zeros(2, dtype=torch.int64)),
                            (torch.randn(4, 31), torch.zeros(4, dtype=torch.int32))):
        with pytest.raises((TypeError, ValueError), match="teacher|labels"):
            torch.ops.fastprobe.bridge_loss(student, teacher, labels, -100, beta_tensor(0.5), 1.0, False, True)
        with pytest.raises((TypeError, ValueError), match="teacher|labels"):
            _bridge_loss_op(student, teacher, labels, -100, beta_tensor(0.5), 1.0, False, True)
    # a teacher of another logits dtype is taken (each input is read in its own dtype)
    loss, grad = _bridge_loss_op(student, torch.randn(4, 31, dtype=torch.bfloat16), None, -100, beta_tensor(0.5), 1.0,
                                 False, True)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32 and not loss.isnan().any()
    for beta in (torch.tensor(0.5), torch.tensor([0.5], dtype=torch.float64)):  # beta: a float64 0-dim CPU tensor
        with pytest.raises((TypeError, ValueError), match="bridge_loss: beta must"):
            torch.ops.fastprobe.bridge_loss(student, student, None, -100, beta, 1.0, False, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_the_op_refuses_scalars_its_kernels_cannot_take(dtype):
    """Called directly, the op refuses a beta or inverse temperature that is not a finite float32
    (inv_temperature also > 0) with an error naming it, in every backend: the reference (float64
    logits) divided by 0 or returned NaN, the C++ kernel's message named no op."""
    from fastprobe.ops.bridge import _bridge_loss_op

    student = torch.randn(4, 31, dtype=dtype)
    for call in (torch.ops.fastprobe.bridge_loss, _bridge_loss_op):
        for inv_temperature in (0.0, -1.0, float("nan"), float("inf"), 1e39):
            with pytest.raises(ValueError, match="bridge_loss: inv_temperature must"):
                call(student, student, None, -100, beta_tensor(0.5), inv_temperature, False, True)
        for beta in (float("nan"), float("-inf"), 1e39):
            with pytest.raises(ValueError, match="bridge_loss: beta must"):
                call(student, student, None, -100, beta_tensor(beta), 1.0, False, True)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype, teacher_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                  (torch.bfloat16, torch.float32), (torch.float32, torch.float16)],
                         ids=str)
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("labels", [False, True], ids=["no-labels", "labels"])
@pytest.mark.parametrize("compute_grad", [False, True], ids=["loss", "grad"])
def test_triton_kernel_stays_inside_its_buffers(dtype, teacher_dtype, direction, labels, compute_grad):
    """The raw op's Triton launch with strided views (the student a transposed buffer's rows at
    vocabulary stride 2N, the teacher one slice of [N, 3, V]) and V = 300 (two interpreter blocks
    and a ragged third): every load and store stays inside the buffers (checked by the
    interpreter, tests/_interpreter_bounds.py), in the rare re-anchoring path too (row 1: its
    largest bridged logit, far above the first block's, in the last column; reverse: its largest
    student logit too, where the centre moves), for rows with no
    finite logit (rows 2 and 3: no P, no Q), ignored rows (labels, ignore_index 7) and a +inf
    loss (row 5); with the teacher in the student's dtype or another."""
    from fastprobe.ops.bridge import _bridge_loss_op

    from ._interpreter_bounds import bounds_checked

    fp.set_backend("triton")
    num_rows, vocab = 6, 300
    student = torch.randn(2 * vocab, num_rows, dtype=dtype).t()[:, ::2]
    teacher = torch.randn(num_rows, 3, vocab, dtype=teacher_dtype)[:, 1]
    student[1, 200:], teacher[1, 200:] = 1e4 + torch.randn(vocab - 200), 1e4 + torch.randn(vocab - 200)
    student[1, -1] = teacher[1, -1] = 1e4 + 100.0  # (past the first block, far above it: re-anchored there)
    student[2], teacher[3] = float("-inf"), float("-inf")
    student[5, 7] = float("-inf")  # (forward, beta = 0: Q > 0 = P; reverse: Q = 0 < P)
    teacher[5, 9] = float("-inf")
    assert student.stride() == (1, 2 * num_rows) and teacher.stride() == (3 * vocab, 1)
    row_labels = torch.tensor([0, 1, 7, 2, 7, 3]) if labels else None
    beta = 0.0 if direction == "forward" else 0.5
    with bounds_checked() as launches:
        loss, grad = _bridge_loss_op(student, teacher, row_labels, 7, beta_tensor(beta), 1.25, direction == "reverse",
                                     compute_grad)
    assert len(launches) == 1
    want = reference.bridge_loss(student.double(), teacher.double(), beta=beta, direction=direction,
                                 temperature=0.8, reduction="none")
    if labels:
        want[row_labels == 7] = 0.0
    torch.testing.assert_close(loss.double(), want, rtol=1e-4, atol=1e-4, equal_nan=True)
    if compute_grad:
        assert grad.shape == (num_rows, vocab) and not grad[[0, 1]].isnan().any()


@pytest.mark.parametrize("inv_temperature", [1e39, 1e-50, float("inf"), 0.0])
def test_triton_launcher_refuses_an_inverse_temperature_float32_cannot_hold(inv_temperature):
    """The Triton launcher takes inv_temperature as a float32 (kernels/_launch.py's
    check_inv_temperature, as the other vocabulary launchers): 1e39 (inf there) and 1e-50 (0)
    are refused before any launch, not run into NaN losses (its own check was float64's)."""
    from fastprobe.kernels import bridge as triton_bridge

    student = torch.randn(2, 40)
    loss = torch.empty(2)
    with pytest.raises(ValueError, match="inv_temperature"):
        triton_bridge.bridge_loss(student, student, None, -100, 0.5, inv_temperature, False, loss, None)


@pytest.mark.parametrize("beta", [1e39, -1e39, float("nan")])
def test_triton_launcher_refuses_a_beta_float32_cannot_hold(beta):
    """The Triton launcher takes beta as a float32: 1e39 (inf there) is refused before any launch,
    as by the op and the C++ kernel (its check was float64's isfinite)."""
    from fastprobe.kernels import bridge as triton_bridge

    student = torch.randn(2, 40)
    with pytest.raises(ValueError, match="beta"):
        triton_bridge.bridge_loss(student, student, None, -100, beta, 1.0, False, torch.empty(2), None)


@pytest.mark.parametrize("student, error", [(torch.randn(4, 0), ValueError), (torch.randn(31), ValueError),
                                            (torch.ones(4, 31, dtype=torch.int64), TypeError)],
                         ids=["empty-vocabulary", "1-D", "int64"])
def test_the_op_refuses_a_student_its_kernels_cannot_take(student, error):
    """Called directly, the op refuses in every backend what bridge_loss refuses: V = 0 (C++
    raised, Triton gave loss 0, the reference NaN), a 1-D student (an unpacking error) and
    integer logits (the reference backend, the default for them, gave loss 0)."""
    from fastprobe.ops.bridge import _bridge_loss_op

    for call in (torch.ops.fastprobe.bridge_loss, _bridge_loss_op):
        with pytest.raises(error, match="bridge_loss: student must be"):
            call(student, torch.zeros_like(student), None, -100, beta_tensor(0.5), 1.0, False, True)


def test_opcheck():
    from fastprobe.ops.bridge import _bridge_loss_op

    student = torch.randn(4, 31, requires_grad=True)
    for teacher_dtype in (torch.float32, torch.bfloat16, torch.float64):  # (the fake's dtypes of a mixed call too)
        teacher = torch.randn(4, 31, dtype=teacher_dtype)
        args = (student, teacher, torch.tensor([1, -100, 2, 3]), -100, beta_tensor(0.4), 1.25, False, True)
        torch.library.opcheck(_bridge_loss_op.op, args, test_utils=("test_schema", "test_faketensor"))


# ---------------------------------------------------------------- schedule and modules


def test_beta_schedule():
    assert fp.beta_schedule(0, 100, 0.0, 2.0) == 0.0
    assert fp.beta_schedule(25, 100, 0.0, 2.0) == 0.5
    assert fp.beta_schedule(100, 100, 0.0, 2.0) == 2.0
    assert fp.beta_schedule(150, 100, 0.0, 2.0) == 2.0 and fp.beta_schedule(-5, 100, 1.0, 0.0) == 1.0
    with pytest.raises(ValueError, match="total"):
        fp.beta_schedule(1, 0, 0.0, 1.0)


def test_beta_schedule_under_inductor_follows_the_step():
    """The schedule's beta, traced from the step and made a tensor (beta_tensor), under inductor
    matches eager at every step, in and outside [0, total]. (torch 2.11's inductor cast the float
    max/min of step / total to int64 in its C++ code: beta stayed beta_start until the step
    reached total.)"""
    def scaled(x, step):
        return x * beta_tensor(fp.beta_schedule(step, 10, 0.5, 2.5))

    compiled = torch.compile(scaled, backend="inductor", fullgraph=True)
    x = torch.ones((), dtype=torch.float64)
    for step in (0, 1, 4, 7, 10, 13, -2):
        assert compiled(x, step).item() == pytest.approx(fp.beta_schedule(step, 10, 0.5, 2.5), abs=1e-12), step


def test_uint64_labels_past_int64_are_refused():
    """A uint64 label >= 2**63 wrapped to a negative int64: 2**64 - 100 became -100, the default
    ignore_index, and its row was silently dropped from the loss. Refused; smaller ones count."""
    student, teacher = torch.randn(3, 7), torch.randn(3, 7)
    labels = torch.tensor([1, 2, 3], dtype=torch.uint64)
    want = fp.bridge_loss(student, teacher, beta=0.5, labels=labels.long())
    assert torch.equal(fp.bridge_loss(student, teacher, beta=0.5, labels=labels), want)
    with pytest.raises(ValueError, match="labels must be < 2\\*\\*63"):
        fp.bridge_loss(student, teacher, beta=0.5, labels=torch.full((3,), 2**64 - 100, dtype=torch.uint64))


@pytest.mark.parametrize("args, error, words", [
    ((float("nan"), 100, 0.0, 1.0), ValueError, "step must be a number"),  # (was a NaN beta)
    (("3", 100, 0.0, 1.0), TypeError, "step must be a number"),  # (was str / int's TypeError, naming nothing)
    ((None, 100, 0.0, 1.0), TypeError, "step must be a number"),
    ((True, 100, 0.0, 1.0), TypeError, "step must be a number"),
    ((1, float("nan"), 0.0, 1.0), TypeError, "total must be an integer"),  # (NaN passed total <= 0)
    ((1, True, 0.0, 1.0), TypeError, "total must be an integer"),
    ((1, 100, float("nan"), 1.0), ValueError, "beta_start must be a finite number"),
    ((1, 100, 0.0, float("inf")), ValueError, "beta_end must be a finite number"),
])
def test_beta_schedule_refuses_bad_arguments_by_name(args, error, words):
    with pytest.raises(error, match=words):
        fp.beta_schedule(*args)
    if args[0] != args[0]:  # the step of a loss module's call: named there too, not as a NaN beta
        with pytest.raises(error, match=words):
            fp.BridgeLoss(beta_start=0.0, beta_end=1.0, total_steps=10)(torch.randn(2, 5), torch.randn(2, 5), step=args[0])


def test_bridge_loss_module_follows_schedule():
    student, teacher = torch.randn(5, 20), torch.randn(5, 20)
    module = fp.BridgeLoss(beta_start=0.0, beta_end=2.0, total_steps=10, temperature=0.9)
    for step, beta in ((0, 0.0), (5, 1.0), (20, 2.0)):
        want = fp.bridge_loss(student, teacher, beta=beta, temperature=0.9)
        torch.testing.assert_close(module(student, teacher, step=step), want)
    with pytest.raises(ValueError, match="beta"):
        fp.BridgeLoss()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_rows", [1, 7, None])
@pytest.mark.parametrize("layout", ["row-major", "column-major"])
def test_fused_linear_matches_unfused(dtype, reduction, chunk_rows, layout, monkeypatch):
    """float64 keeps float64 precision: its loss, mean factor and weight and bias gradients are
    formed in float64 (float32_weight_grad widens lower precisions only), not in float32. Hidden
    states stored column-major too (torch 2.7's bfloat16 CPU product got one such row wrong)."""
    num_rows, hidden_s, hidden_t, vocab = 19, 24, 40, 301
    if chunk_rows == 7:  # bfloat16's weight gradient formed in slabs of 50 vocabulary rows (the last of 1)
        monkeypatch.setattr("fastprobe.ops.bridge._WEIGHT_GRAD_SLAB", 50 * hidden_s)

    def hidden_states(width):
        return torch.randn(num_rows, width, dtype=dtype) if layout == "row-major" else torch.randn(width, num_rows, dtype=dtype).t()
    h_s = hidden_states(hidden_s)
    w_s = (torch.randn(vocab, hidden_s) / hidden_s**0.5).to(dtype)
    b_s = torch.randn(vocab).to(dtype)
    h_t, w_t = hidden_states(hidden_t), (torch.randn(vocab, hidden_t) / hidden_t**0.5).to(dtype)
    labels = random_labels(num_rows, "cpu")
    options = dict(beta=0.6, temperature=0.8, direction="forward", reduction=reduction)

    fused_inputs = [t.clone().requires_grad_() for t in (h_s, w_s, b_s)]
    loss_fn = fp.FusedLinearBridgeLoss(chunk_rows=chunk_rows, **options)
    fused = loss_fn(fused_inputs[0], fused_inputs[1], h_t, w_t, labels=labels, student_bias=fused_inputs[2])
    fused.backward()

    plain_inputs = [t.detach().double().requires_grad_() for t in (h_s, w_s, b_s)]
    logits_s = torch.nn.functional.linear(*plain_inputs)
    logits_t = torch.nn.functional.linear(h_t.double(), w_t.double())
    plain = reference.bridge_loss(logits_s, logits_t, labels=labels, **options)
    plain.backward()

    def assert_near(got, want):
        # bfloat16 rounds logit gradients and matmul outputs to 8 bits: errors scale with the
        # largest entry, not with each entry
        if dtype == torch.float64:
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
        elif dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        else:
            torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2 * want.abs().max().item())

    assert_near(fused.double(), plain.detach())
    for got, want in zip(fused_inputs, plain_inputs):
        assert got.grad.dtype == got.dtype
        assert_near(got.grad.double(), want.grad)


def _loss_scaled_grads(loss_fn, hidden, weight, teacher_hidden, teacher_weight, scale):
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    (loss_fn(hidden, weight, teacher_hidden, teacher_weight) * scale).backward()
    return hidden.grad.double() / scale, weight.grad.double() / scale


def test_fused_linear_float16_student_keeps_small_gradients_under_loss_scaling():
    """A float16 student under loss scaling (torch.amp.GradScaler's recipe: (loss * S).backward(),
    then the gradients divided by S): the mean's 1 / N was applied to the 16-bit logit gradient
    in the forward, before S, so its entries below float16's range were flushed (a relative error
    of several percent in the hidden states' gradient at N = 8192)."""
    torch.manual_seed(0)
    rows, vocab, width, scale = 4096, 1024, 32, 2.0 ** 16
    hidden = torch.randn(rows, width).half()
    weight = (torch.randn(vocab, width) / width ** 0.5).half()
    teacher_hidden, teacher_weight = torch.randn(rows, width), torch.randn(vocab, width) / width ** 0.5
    loss_fn = fp.FusedLinearBridgeLoss(beta=0.5)
    want = _loss_scaled_grads(loss_fn, hidden.double(), weight.double(), teacher_hidden.double(),
                              teacher_weight.double(), scale)
    got = _loss_scaled_grads(loss_fn, hidden, weight, teacher_hidden, teacher_weight, scale)
    for name, g, w in zip(("student_hidden", "student_weight"), got, want):
        error = float((g - w).norm() / w.norm())
        # one float16 rounding of the result is ~3e-4 here (eager: logits in float16, loss in float32)
        assert error < 2e-3, f"{name}'s gradient is {error:.3g} off the float64 one"
        assert not bool(((g == 0) & (w != 0)).any()), f"{name}'s gradient has entries flushed to 0"


def test_fused_linear_under_no_grad_forms_no_gradient():
    """An evaluation under torch.no_grad (a trainable student, no backward to come) gives the same
    loss and forms no gradient: before, autograd.Function's needs_input_grad (True under no_grad)
    made it form the [N, H] and float32 [V, H] gradients and the chunks' [rows, V] ones."""
    num_rows, hidden, vocab = 6, 10, 53
    h_s, w_s = torch.randn(num_rows, hidden, requires_grad=True), torch.randn(vocab, hidden, requires_grad=True)
    h_t, w_t = torch.randn(num_rows, 7), torch.randn(vocab, 7)
    loss_fn = fp.FusedLinearBridgeLoss(beta=0.5, chunk_rows=4)
    with torch.no_grad():
        with VocabularySized((vocab, hidden)) as weight_sized, VocabularySized((4, vocab)) as logit_grads:
            loss = loss_fn(h_s, w_s, h_t, w_t)
    assert not loss.requires_grad and not weight_sized.storages
    # (the chunk's logits of student and teacher only, no gradient buffer)
    assert len(logit_grads.storages) <= 2
    torch.testing.assert_close(loss, loss_fn(h_s, w_s, h_t, w_t).detach())


@pytest.mark.parametrize("student_dtype, teacher_dtype",
                         MIXED_DTYPES + [(torch.float32, torch.float64), (torch.float64, torch.bfloat16)], ids=str)
def test_fused_linear_teacher_of_another_dtype(student_dtype, teacher_dtype, monkeypatch):
    """A teacher in another dtype than the student (a bfloat16 teacher distilled into a float32
    student): each chunk's teacher logits reach the fused op in the teacher's dtype, not copied into
    the student's (they were: one more [rows, V] tensor per chunk), and the loss and gradients are
    bridge_loss's on the two sides' logits. float64 on either side: a float64 loss."""
    from fastprobe.ops import bridge as bridge_ops

    seen = []
    op = bridge_ops._bridge_loss_op

    def spy(student, teacher, *args):
        seen.append((student.dtype, teacher.dtype))
        return op(student, teacher, *args)

    monkeypatch.setattr(bridge_ops, "_bridge_loss_op", spy)
    h_s, w_s = torch.randn(9, 16).to(student_dtype), (torch.randn(301, 16) / 4).to(student_dtype)
    h_t, w_t = torch.randn(9, 12).to(teacher_dtype), (torch.randn(301, 12) / 3).to(teacher_dtype)
    labels = torch.tensor([0, 1, -100, 2, 3, -100, 4, 5, 6])
    h_fused, h_plain = h_s.clone().requires_grad_(), h_s.clone().requires_grad_()
    w_fused, w_plain = w_s.clone().requires_grad_(), w_s.clone().requires_grad_()
    fused = fp.FusedLinearBridgeLoss(beta=0.5, chunk_rows=4)(h_fused, w_fused, h_t, w_t, labels=labels)
    fused.backward()
    assert seen == [(student_dtype, teacher_dtype)] * 3
    logits_t = torch.nn.functional.linear(h_t, w_t)
    plain = fp.bridge_loss(torch.nn.functional.linear(h_plain, w_plain), logits_t, beta=0.5, labels=labels)
    plain.backward()
    float64 = torch.float64 in (student_dtype, teacher_dtype)
    assert fused.dtype == plain.dtype == (torch.float64 if float64 else torch.float32)
    wide = student_dtype in (torch.float32, torch.float64)
    tolerance = dict(rtol=1e-5, atol=1e-6) if wide else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(fused, plain, **tolerance)
    assert h_fused.grad.dtype == student_dtype and w_fused.grad.dtype == student_dtype
    torch.testing.assert_close(h_fused.grad.double(), h_plain.grad.double(), **tolerance)
    torch.testing.assert_close(w_fused.grad.double(), w_plain.grad.double(), **tolerance)


def test_fused_linear_teacher_side_takes_no_gradient_and_rejects_none():
    h_s, w_s = torch.randn(4, 8, requires_grad=True), torch.randn(30, 8, requires_grad=True)
    h_t, w_t = torch.randn(4, 6, requires_grad=True), torch.randn(30, 6, requires_grad=True)
    fp.FusedLinearBridgeLoss(beta=1.0)(h_s, w_s, h_t, w_t).backward()
    assert h_t.grad is None and w_t.grad is None and h_s.grad is not None and w_s.grad is not None
    # a second backward through one loss: the gradients of a kept graph are scaled out of place
    # (torch >= 2.5 tells); torch 2.4 cannot tell, scales in place and refuses the second
    h_s.grad = w_s.grad = None
    loss = fp.FusedLinearBridgeLoss(beta=1.0)(h_s, w_s, h_t, w_t)
    first = torch.autograd.grad(loss, (h_s, w_s), retain_graph=True)
    if hasattr(torch._C._autograd, "_get_current_graph_task_keep_graph"):
        second = torch.autograd.grad(2 * loss, (h_s, w_s))
        for got, want in zip(second, first):
            torch.testing.assert_close(got, 2 * want)
    else:
        with pytest.raises(RuntimeError, match="second backward"):
            torch.autograd.grad(loss, (h_s, w_s))
    with pytest.raises(ValueError, match="reduction"):
        fp.FusedLinearBridgeLoss(beta=1.0, reduction="none")
    with pytest.raises(ValueError, match="teacher_weight"):
        fp.FusedLinearBridgeLoss(beta=1.0)(h_s, w_s, h_t, torch.randn(31, 6))


# ---------------------------------------------------------------- bad input


def bad_cases():
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    return [
        ("shape mismatch", (s, torch.randn(4, 11)), {}, ValueError, "teacher_logits"),
        ("rows mismatch", (s, torch.randn(5, 10)), {}, ValueError, "teacher_logits"),
        ("1-D logits", (torch.randn(10), torch.randn(10)), {}, ValueError, "student_logits"),
        ("integer logits", (torch.randint(0, 3, (4, 10)), t), {}, TypeError, "student_logits"),
        ("integer teacher", (s, t.int()), {}, TypeError, "teacher_logits"),
        ("other device", (s, torch.empty(4, 10, device="meta")), {}, ValueError, "teacher_logits"),
        ("labels length", (s, t), {"labels": torch.zeros(3, dtype=torch.long)}, ValueError, "labels"),
        ("float labels", (s, t), {"labels": torch.zeros(4)}, TypeError, "labels"),
        ("direction", (s, t), {"direction": "sideways"}, ValueError, "direction"),
        ("reduction", (s, t), {"reduction": "max"}, ValueError, "reduction"),
        ("beta tensor", (s, t), {"beta": torch.tensor(0.5)}, TypeError, "beta"),
        ("beta nan", (s, t), {"beta": float("nan")}, ValueError, "beta"),
        ("temperature", (s, t), {"temperature": -1.0}, ValueError, "temperature"),
        ("temperature below float32", (s, t), {"temperature": 1e-50}, ValueError, "temperature"),
        ("beta beyond float32", (s, t), {"beta": 1e39}, ValueError, "beta"),
        ("ignore_index beyond int64", (s, t), {"ignore_index": 2**63}, ValueError, "ignore_index"),
        ("ignore_index float", (s, t), {"ignore_index": 1.0}, TypeError, "ignore_index"),
        ("empty vocabulary", (torch.randn(4, 0), torch.randn(4, 0)), {}, ValueError, "V = 0"),
        ("labels a list", (s, t), {"labels": [0, 1, 2, 3]}, TypeError, r"labels must be an integer tensor of shape \[4\], got list"),
        ("labels device", (s, t), {"labels": torch.zeros(4, dtype=torch.long, device="meta")}, ValueError,
         "labels is on meta but student_logits is on cpu"),
    ]


@pytest.mark.parametrize("case", bad_cases(), ids=lambda case: case[0])
def test_bad_input_raises_clear_error(case):
    _, args, kwargs, error, words = case
    kwargs = {"beta": 0.5, **kwargs}
    real = [a for a in args if a.device.type != "meta"]
    copies = [a.clone() for a in real]
    with pytest.raises(error, match=words):
        fp.bridge_loss(*args, **kwargs)
    for original, copy in zip(real, copies):
        assert torch.equal(original, copy)


def fused_linear_bad_cases():
    vocab = 30
    return [
        ("student_bias [V + 1]", {"student_bias": torch.randn(vocab + 1)}, ValueError,
         r"student_bias must have shape \[V\]"),
        ("student_bias [1]", {"student_bias": torch.zeros(1)}, ValueError, "student_bias"),
        ("teacher_bias [3]", {"teacher_bias": torch.randn(3)}, ValueError, r"teacher_bias must have shape \[V\]"),
        ("student_bias 2-D", {"student_bias": torch.randn(1, vocab)}, ValueError, "student_bias"),
        ("integer bias", {"student_bias": torch.zeros(vocab, dtype=torch.long)}, TypeError, "student_bias"),
        ("bias a list", {"student_bias": [0.0] * vocab}, TypeError, "student_bias"),
        ("bias dtype", {"teacher_bias": torch.randn(vocab).half()}, TypeError, "teacher_bias dtype"),
        ("bias device", {"student_bias": torch.empty(vocab, device="meta")}, ValueError, "student_bias is on meta"),
        ("student dtypes", {"student_weight": torch.randn(vocab, 8).half()}, TypeError,
         "student_weight dtype torch.float16 must match student_hidden"),
        ("teacher dtypes", {"teacher_hidden": torch.randn(4, 6).bfloat16()}, TypeError,
         "teacher_weight dtype torch.float32 must match teacher_hidden"),
        ("student width", {"student_weight": torch.randn(vocab, 7)}, ValueError,
         r"student_weight must be \[V, Hs\] with Hs = 8, got \[30, 7\]"),
        ("teacher width", {"teacher_weight": torch.randn(vocab, 5)}, ValueError,
         r"teacher_weight must be \[V, Ht\] with Ht = 6, got \[30, 5\]"),
        ("teacher rows", {"teacher_hidden": torch.randn(3, 6)}, ValueError,
         "teacher_hidden has 3 rows but student_hidden has 4"),
    ]


@pytest.mark.parametrize("case", fused_linear_bad_cases(), ids=lambda case: case[0])
def test_fused_linear_bad_input_raises_clear_error(case):
    """Biases (None or a floating [V] tensor of the weight's dtype, on the hidden states' device)
    and each side's hidden / weight dtypes are checked by name before any chunk runs (they failed
    in torch's linear, or a [1] bias broadcast silently); the inputs are left untouched."""
    _, changes, error, words = case
    inputs = {"student_hidden": torch.randn(4, 8, requires_grad=True), "student_weight": torch.randn(30, 8),
              "teacher_hidden": torch.randn(4, 6), "teacher_weight": torch.randn(30, 6), **changes}
    copies = {name: value.clone() for name, value in inputs.items()
              if isinstance(value, torch.Tensor) and value.device.type != "meta"}
    with pytest.raises(error, match=words):
        fp.FusedLinearBridgeLoss(beta=0.5)(**inputs)
    for name, copy in copies.items():
        assert torch.equal(inputs[name], copy)
    assert inputs["student_hidden"].grad is None


@pytest.mark.parametrize("chunk_rows, error", [(0, ValueError), (-3, ValueError), (2.5, TypeError), ("4", TypeError),
                                               (True, TypeError)])
def test_fused_linear_chunk_rows_checked_at_construction(chunk_rows, error):
    with pytest.raises(error, match="chunk_rows must be"):
        fp.FusedLinearBridgeLoss(beta=0.5, chunk_rows=chunk_rows)


def test_fused_linear_under_autocast_takes_mixed_dtypes():
    """Mixed-precision training: bfloat16 hidden states (autocast's) with float32 weights, as
    autocast's matrix products take them; the loss equals bridge_loss on the same logits."""
    torch.manual_seed(0)
    hidden = torch.randn(8, 16, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    teacher_hidden, teacher_weight = torch.randn(8, 16, dtype=torch.bfloat16), torch.randn(50, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fp.FusedLinearBridgeLoss(beta=0.5)(hidden, weight, teacher_hidden, teacher_weight)
        student_logits, teacher_logits = hidden @ weight.t(), teacher_hidden @ teacher_weight.t()
    loss.backward()
    assert weight.grad.dtype == torch.float32 and hidden.grad.dtype == torch.bfloat16
    want = fp.bridge_loss(student_logits.detach(), teacher_logits, beta=0.5)
    torch.testing.assert_close(loss.detach(), want.to(loss.dtype), rtol=1e-3, atol=1e-3)
    with pytest.raises(TypeError, match="student_weight dtype torch.float32 must match"):
        fp.FusedLinearBridgeLoss(beta=0.5)(hidden, weight, teacher_hidden, teacher_weight)


def test_fused_linear_names_a_sharded_fsdp2_weight(one_rank_group):
    """A weight of FSDP2's fully_shard read outside the forward that gathers it is a DTensor: refused
    naming the argument and the way out (torch's error inside the chunk loop, "aten.mm.default got
    mixed torch.Tensor and DTensor", named neither); that way out (a registered forward method)
    gives the loss and gradients of the plain computation."""
    fsdp = pytest.importorskip("torch.distributed.fsdp")
    if not hasattr(fsdp, "fully_shard") or not hasattr(fsdp, "register_fsdp_forward_method"):
        pytest.skip("FSDP2 (torch.distributed.fsdp.fully_shard) needs torch >= 2.6")
    num_rows, hidden, vocab = 7, 8, 29
    hidden_states, teacher_hidden = torch.randn(num_rows, hidden), torch.randn(num_rows, 5)
    teacher_weight = torch.randn(vocab, 5)
    labels = random_labels(num_rows, "cpu")
    head = torch.nn.Linear(hidden, vocab, bias=False)
    weight = head.weight.detach().double().requires_grad_()
    loss_fn = fp.FusedLinearBridgeLoss(beta=0.5, chunk_rows=3)
    fsdp.fully_shard(head)  # (its weight is a DTensor now, gathered only inside head's forward)
    with pytest.raises(TypeError, match="student_weight is a DTensor.*register_fsdp_forward_method"):
        loss_fn(hidden_states, head.weight, teacher_hidden, teacher_weight, labels=labels)
    with pytest.raises(TypeError, match="teacher_weight is a DTensor"):
        loss_fn(hidden_states, weight.detach().float(), hidden_states, head.weight, labels=labels)
    type(head).bridge_loss = lambda module, *args, **kwargs: loss_fn(args[0], module.weight, *args[1:], **kwargs)
    try:
        fsdp.register_fsdp_forward_method(head, "bridge_loss")
        loss = head.bridge_loss(hidden_states, teacher_hidden, teacher_weight, labels=labels)
        loss.backward()
    finally:
        del type(head).bridge_loss
    want = reference.bridge_loss(hidden_states.double() @ weight.T, (teacher_hidden @ teacher_weight.T).double(),
                                 beta=0.5, labels=labels)
    want.backward()
    torch.testing.assert_close(loss.double(), want, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(head.weight.grad.full_tensor().double(), weight.grad, rtol=RTOL, atol=ATOL)


class TiedStudent(torch.nn.Module):
    """An embedding tied to the LM head around one hidden layer; forward gives the distillation
    loss of a micro-batch (DDP's pattern: the loss inside the wrapped forward), by bridge_loss on
    the logits, FusedLinearBridgeLoss on the hidden states, or the reference (autograd)."""

    def __init__(self, vocab, hidden, loss):
        super().__init__()
        self.embed, self.block, self.loss = torch.nn.Embedding(vocab, hidden), torch.nn.Linear(hidden, hidden), loss

    def forward(self, ids, teacher_logits, labels):
        states = torch.tanh(self.block(self.embed(ids))).flatten(0, 1)  # the tied weight's first use
        teacher_logits, labels = teacher_logits.flatten(0, 1), labels.flatten()
        if self.loss == "fused":  # its second use, as the LM head (the teacher's: its logits times I)
            loss_fn = fp.FusedLinearBridgeLoss(beta=0.7, direction="reverse", chunk_rows=5)
            return loss_fn(states, self.embed.weight, teacher_logits, torch.eye(teacher_logits.shape[1]), labels=labels)
        loss = fp.bridge_loss if self.loss == "logits" else reference.bridge_loss
        return loss(states @ self.embed.weight.T, teacher_logits, beta=0.7, direction="reverse", labels=labels)


def train_tied_student(student, batches, rows=slice(None), no_sync=None):
    """Two SGD steps, each over two micro-batches of (ids, teacher logits, labels) whose mean loss
    is the step's loss (gradient accumulation; the first micro-batch under no_sync when given)."""
    optimizer = torch.optim.SGD(student.parameters(), lr=2.0)
    for _ in range(2):
        optimizer.zero_grad()
        for index, (ids, teacher_logits, labels) in enumerate(batches):
            with no_sync() if no_sync is not None and index == 0 else contextlib.nullcontext():
                (student(ids[rows], teacher_logits[rows], labels[rows]) / len(batches)).backward()
        optimizer.step()


def _ddp_worker(rank, world_size, init_file, out_dir, state, batches):
    """One rank of test_ddp_training_matches_one_process: its half of every micro-batch."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    if os.path.exists("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        trained = {}
        for loss in ("logits", "fused"):
            student = TiedStudent(*state["embed.weight"].shape, loss)
            student.load_state_dict(state)
            ddp = torch.nn.parallel.DistributedDataParallel(student, find_unused_parameters=False)
            rows = slice(rank * 3, rank * 3 + 3)  # (sequences 0-2 and 3-5 of 6)
            train_tied_student(ddp, batches, rows, ddp.no_sync)
            trained[loss] = student.state_dict()
        torch.save(trained, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_training_matches_one_process(tmp_path):
    """Two gloo ranks train a student whose embedding is tied to its LM head under
    DistributedDataParallel (find_unused_parameters off, gradient accumulation with no_sync), with
    bridge_loss and with FusedLinearBridgeLoss: the parameters after two steps are those of one
    process training on the whole batches with the float64 reference, so the tied weight's
    gradient sums both uses. (Each rank's micro-batch keeps as many rows as the other's: a "mean"
    of each rank's rows, which DDP averages, is then the mean over the whole batch.)"""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is unavailable")
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    vocab, hidden, length = 19, 6, 4
    state = TiedStudent(vocab, hidden, "reference").state_dict()
    batches = []
    for _ in range(2):
        labels = torch.randint(0, vocab, (6, length))
        labels[:, 0] = -100  # (one ignored position per sequence: the ranks keep equal counts)
        labels[[0, 4], 1:3] = -100
        batches.append((torch.randint(0, vocab, (6, length)), 3 * torch.randn(6, length, vocab), labels))
    spawn_gloo_ranks(_ddp_worker, (2, str(tmp_path / "init"), str(tmp_path), state, batches), tmp_path, 120)
    want = TiedStudent(vocab, hidden, "reference").double()
    want.load_state_dict(state)
    train_tied_student(want, [(ids, teacher_logits.double(), labels) for ids, teacher_logits, labels in batches])
    for rank in range(2):
        trained = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for loss in ("logits", "fused"):
            for name, value in want.state_dict().items():
                assert not torch.allclose(value.float(), state[name], rtol=0, atol=1e-3), name  # (training moved it)
                torch.testing.assert_close(trained[loss][name].double(), value, rtol=RTOL, atol=ATOL,
                                           msg=lambda text: f"{loss}, rank {rank}, {name}: {text}")
