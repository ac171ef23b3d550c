"""BridgeLoss and FusedLinearBridgeLoss options: checked where they are set, at construction
and on any later assignment, so a bad value never reaches a forward."""

import pytest
import torch

import fastprobe as fp

# (attribute, a bad value, the error, words of its message); every one is refused by both modules
BAD_OPTIONS = [
    ("temperature", 0.0, ValueError, "temperature"),
    ("temperature", "1.0", TypeError, "temperature"),
    ("direction", "sideways", ValueError, "direction"),
    ("ignore_index", 1.5, TypeError, "ignore_index"),
    ("ignore_index", 2**63, ValueError, "ignore_index"),
    ("reduction", "average", ValueError, "reduction"),
    ("beta", torch.tensor(0.5), TypeError, "beta"),
    ("beta", float("nan"), ValueError, "beta"),
    ("beta_start", "0", TypeError, "beta_start"),
    ("beta_end", float("inf"), ValueError, "beta_end"),
    ("total_steps", 0, ValueError, "total_steps"),
    ("total_steps", 2.5, TypeError, "total_steps"),
]
FUSED_ONLY = [
    ("reduction", "none", ValueError, "reduction"),  # (the fused form gives a scalar only)
    ("chunk_rows", -1, ValueError, "chunk_rows must be"),
    ("chunk_rows", 0, ValueError, "chunk_rows must be"),
    ("float32_weight_grad", "yes", TypeError, "float32_weight_grad"),
]


def fused_inputs(num_rows=5, hidden=8, vocab=23):
    torch.manual_seed(0)
    return (torch.randn(num_rows, hidden, requires_grad=True), torch.randn(vocab, hidden),
            torch.randn(num_rows, hidden), torch.randn(vocab, hidden))


@pytest.mark.parametrize("module, case", [(module, case) for module in (fp.BridgeLoss, fp.FusedLinearBridgeLoss)
                                          for case in BAD_OPTIONS] +
                         [(fp.FusedLinearBridgeLoss, case) for case in FUSED_ONLY],
                         ids=lambda value: value.__name__ if isinstance(value, type) else f"{value[0]}={value[1]!r}")
def test_an_option_set_after_construction_is_checked(module, case):
    """A bad option assigned to a built module raises at the assignment and leaves the module as
    it was. (FusedLinearBridgeLoss checked reduction and chunk_rows in its constructor only: a
    reduction of "none" set later gave the sum, a chunk_rows of -1 a loss of 0 from no chunk.)"""
    name, value, error, words = case
    loss_fn = module(beta=0.5)
    before = dict(vars(loss_fn))
    with pytest.raises(error, match=words):
        setattr(loss_fn, name, value)
    assert vars(loss_fn) == before


@pytest.mark.parametrize("module", [fp.BridgeLoss, fp.FusedLinearBridgeLoss], ids=lambda m: m.__name__)
@pytest.mark.parametrize("case", BAD_OPTIONS, ids=lambda case: f"{case[0]}={case[1]!r}")
def test_a_bad_option_is_refused_at_construction(module, case):
    """The same checks at construction: BridgeLoss(temperature=0) raised only at its first call."""
    name, value, error, words = case
    options = {"beta": 0.5, name: value}
    if name in ("beta_start", "beta_end", "total_steps"):
        options = {"beta_start": 0.0, "beta_end": 1.0, "total_steps": 10, name: value}
    with pytest.raises(error, match=words):
        module(**options)


def test_a_good_option_set_after_construction_takes_effect():
    """Assignment of valid values keeps working: the next call uses them."""
    student, teacher = torch.randn(4, 19), torch.randn(4, 19)
    loss_fn = fp.BridgeLoss(beta=0.5)
    loss_fn.reduction, loss_fn.temperature, loss_fn.beta = "sum", 2, 0.25
    assert isinstance(loss_fn.temperature, float)
    torch.testing.assert_close(loss_fn(student, teacher), fp.bridge_loss(student, teacher, beta=0.25, temperature=2.0,
                                                                         reduction="sum"))
    fused = fp.FusedLinearBridgeLoss(beta=0.5)
    hidden, weight, t_hidden, t_weight = fused_inputs()
    mean = fused(hidden, weight, t_hidden, t_weight)
    fused.reduction, fused.chunk_rows = "sum", 2
    torch.testing.assert_close(fused(hidden, weight, t_hidden, t_weight), mean * hidden.shape[0])


def test_a_schedule_made_incomplete_after_construction_is_a_clear_error():
    """total_steps set on a module built with a fixed beta: the schedule has no ends, a
    ValueError that says so at the next call (it was a TypeError from arithmetic on None)."""
    loss_fn = fp.BridgeLoss(beta=0.5)
    loss_fn.total_steps = 10
    with pytest.raises(ValueError, match="beta_start, beta_end and total_steps"):
        loss_fn(torch.randn(2, 5), torch.randn(2, 5), step=3)
    assert loss_fn.beta_at(None) == 0.5  # (no step: the fixed beta)


def test_fused_linear_refuses_an_empty_vocabulary():
    """Weights with no rows (V = 0) are refused by name, as bridge_loss refuses V = 0 (the default
    chunk size divided by V: a ZeroDivisionError)."""
    hidden, _, t_hidden, _ = fused_inputs()
    for chunk_rows in (None, 2):
        with pytest.raises(ValueError, match=r"student_weight.*V = 0"):
            fp.FusedLinearBridgeLoss(beta=0.5, chunk_rows=chunk_rows)(hidden, torch.randn(0, 8), t_hidden,
                                                                       torch.randn(0, 8))


@pytest.mark.parametrize("module", [fp.BridgeLoss, fp.FusedLinearBridgeLoss], ids=lambda m: m.__name__)
def test_unsetting_the_only_beta_is_refused_at_the_assignment(module):
    """beta = None on a module without a schedule (or total_steps = None on one with only a
    schedule) leaves it no beta: a ValueError naming the option at the assignment, the module
    unchanged. (It raised a TypeError from the loss at the next call.) With a schedule, beta may
    be unset, and a fixed beta lets the schedule go."""
    fixed = module(beta=0.5)
    before = dict(vars(fixed))
    with pytest.raises(ValueError, match="beta = None.*beta_start, beta_end and total_steps"):
        fixed.beta = None
    assert vars(fixed) == before
    scheduled = module(beta_start=0.0, beta_end=1.0, total_steps=10)
    before = dict(vars(scheduled))
    with pytest.raises(ValueError, match="total_steps = None"):
        scheduled.total_steps = None
    assert vars(scheduled) == before
    both = module(beta=0.5, beta_start=0.0, beta_end=1.0, total_steps=10)
    assert both.beta_at(None) == 0.5  # (the fixed beta without a step)
    both.beta = None
    assert both.beta_at(5) == 0.5
    with pytest.raises(ValueError, match="follows a beta schedule .* pass step="):  # (it gave beta_start)
        both.beta_at(None)
    both.beta, both.total_steps = 0.25, None
    assert both.beta_at(5) == 0.25


@pytest.mark.parametrize("student_dtype, teacher_dtype",
                         [(torch.bfloat16, torch.float32), (torch.float32, torch.float16), (torch.float16, torch.bfloat16)],
                         ids=str)
def test_modules_take_student_and_teacher_of_different_dtypes(student_dtype, teacher_dtype):
    """BridgeLoss on a schedule and FusedLinearBridgeLoss take a student and a teacher of different
    dtypes (each read in its own): BridgeLoss gives bridge_loss's loss on the teacher cast up
    (the same bits), the gradient in the student's dtype; FusedLinearBridgeLoss, whose two sides may
    differ (each side's own hidden states and weight agreeing), gives the plain loss on its logits."""
    loss_fn = fp.BridgeLoss(beta_start=0.0, beta_end=1.0, total_steps=4, direction="reverse", reduction="sum")
    student = torch.randn(5, 37).to(student_dtype).requires_grad_()
    teacher = torch.randn(5, 37).to(teacher_dtype)
    loss = loss_fn(student, teacher, step=3)
    loss.backward()
    assert student.grad.dtype == student_dtype
    common = torch.promote_types(student_dtype, teacher_dtype)
    want = fp.bridge_loss(student.detach().to(common), teacher.to(common), beta=0.75, direction="reverse",
                          reduction="sum")
    assert torch.equal(loss.detach(), want)

    hidden, weight, t_hidden, t_weight = fused_inputs()
    hidden, weight = hidden.detach().to(student_dtype).requires_grad_(), weight.to(student_dtype)
    t_hidden, t_weight = t_hidden.to(teacher_dtype), t_weight.to(teacher_dtype)
    fused = fp.FusedLinearBridgeLoss(beta=0.5, chunk_rows=2)(hidden, weight, t_hidden, t_weight)
    fused.backward()
    assert hidden.grad.dtype == student_dtype
    plain = fp.bridge_loss(hidden.detach() @ weight.t(), t_hidden @ t_weight.t(), beta=0.5)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("module", [fp.BridgeLoss, fp.FusedLinearBridgeLoss], ids=lambda m: m.__name__)
@pytest.mark.parametrize("ends", [dict(beta_start=0.0, beta_end=1.0), dict(beta_start=0.0), dict(beta_end=1.0)],
                         ids=lambda ends: ",".join(ends))
def test_schedule_ends_without_total_steps_are_refused(module, ends):
    """beta_start / beta_end given with a fixed beta but no total_steps: a ValueError naming
    total_steps at construction. (They were kept and never used: the fixed beta ran at every step.)"""
    with pytest.raises(ValueError, match="only with total_steps"):
        module(beta=0.5, **ends)


def test_fused_linear_16_bit_weight_gradient_summed_in_16_bits_is_the_mean_loss_gradient():
    """float32_weight_grad=False with a 16-bit student weight and reduction "mean": the logit
    gradient is scaled by 1 / N in the forward, chunk by chunk (a 16-bit weight gradient of unscaled
    row sums could overflow), not in the backward as for the other dtypes; every gradient is the
    mean loss's, as the float64 reference's on the same bfloat16-rounded logits."""
    from fastprobe import reference

    hidden, weight, t_hidden, t_weight = (x.detach().bfloat16() for x in fused_inputs(num_rows=6))
    trained = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    loss = fp.FusedLinearBridgeLoss(beta=0.5, chunk_rows=2, float32_weight_grad=False)(*trained, t_hidden, t_weight)
    loss.backward()
    plain = [x.double().requires_grad_() for x in (hidden, weight)]
    logits = plain[0] @ plain[1].t()
    logits = logits + (logits.bfloat16().double() - logits).detach()  # rounded as the chunks' logits, same gradient
    want = reference.bridge_loss(logits, (t_hidden @ t_weight.t()).double(), beta=0.5)
    want.backward()
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-4, atol=1e-4)
    for got, expected in zip(trained, plain):
        assert got.grad.dtype == torch.bfloat16
        torch.testing.assert_close(got.grad.double(), expected.grad, rtol=3e-2, atol=3e-2 * expected.grad.abs().max().item())
