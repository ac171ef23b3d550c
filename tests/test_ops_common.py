"""The op layer shared by every family (fastprobe/ops/_common.py): plain eager calls run a
custom op's body directly, everything that needs torch's dispatcher (autograd, dispatch and
function modes, fake / meta tensors, torch.compile) goes through the registered op, and both
give the same results."""

import contextlib
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastprobe as fp
from fastprobe.ops import _common, attention, bridge, dual_attention
from fastprobe.ops import concepts as concept_ops

pytestmark = pytest.mark.usefixtures("one_thread")


# torch >= 2.5 tells a backward whether its graph is kept (a second backward through the fused
# bridge loss needs it)
KNOWS_KEPT_GRAPH = hasattr(torch._C._autograd, "_get_current_graph_task_keep_graph")


class OpLog(TorchDispatchMode):
    """Records the name of every op that reaches the dispatcher."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.name()))
        return func(*args, **(kwargs or {}))


class NoOpFunctionMode(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def attention_inputs():
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 11, 8), torch.randn(2, 2, 11, 8)
    padding = torch.ones(2, 11, dtype=torch.bool)
    padding[1, :3] = False
    return q, k, v, padding


CALLS = {
    "sink_attention": lambda q, k, v, padding: fp.sink_attention(
        q, k, v, window=4, num_sink=1, key_padding_mask=padding, return_entropy=True),
    "dual_path_attention": lambda q, k, v, padding: fp.dual_path_attention(
        q, k, v, torch.arange(11).expand(2, 11) % 3 == 1, gamma=0.7, rows="all", key_padding_mask=padding,
        return_paths=True),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_eager_shortcut_skips_the_dispatcher_and_matches_it(name):
    inputs = attention_inputs()
    with OpLog() as log:  # a dispatch mode: the registered op runs, and is seen
        through_op = CALLS[name](*inputs)
    assert f"fastprobe::{name}" in log.names
    with NoOpFunctionMode():  # a function mode also takes the registered op
        through_function_mode = CALLS[name](*inputs)
    direct = CALLS[name](*inputs)
    for got, want, other in zip(direct, through_op, through_function_mode):
        if got is not None:
            torch.testing.assert_close(got, want, rtol=0, atol=0)
            torch.testing.assert_close(got, other, rtol=0, atol=0)


# The custom ops, which plain eager calls never enter: the public functions call the kernels
# themselves (a decoding step calls them per layer; the op costs tens of microseconds a call).
NEVER_REACHED = {"sink_attention": attention, "dual_path_attention": dual_attention}


@pytest.mark.parametrize("name", list(CALLS))
def test_plain_eager_call_skips_the_op(name, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the op ran")

    monkeypatch.setattr(NEVER_REACHED[name], f"_{name}_op", refuse)
    inputs = attention_inputs()
    CALLS[name](*inputs)
    with torch.inference_mode():
        CALLS[name](*inputs)
    with pytest.raises(AssertionError, match="the op ran"), NoOpFunctionMode():
        CALLS[name](*inputs)
    with pytest.raises(AssertionError, match="the op ran"):
        CALLS[name](inputs[0].requires_grad_(), *inputs[1:])


# Plain eager calls with an input that requires grad: each records the op's own autograd.Function
# (CustomOp.register_autograd), not torch.library's wrapper, ~35 us less a forward and backward.
# name: (the custom op, a call of logits [3, 11] and other logits [3, 11] giving a tensor)
RECORDED_CALLS = {
    "bridge_loss": (bridge._bridge_loss_op, lambda logits, other: fp.bridge_loss(
        logits, other, beta=0.5, labels=torch.tensor([0, -100, 2]), reduction="none")),
    "bridge_loss_reverse": (bridge._bridge_loss_op, lambda logits, other: fp.bridge_loss(
        logits, other, beta=-0.25, temperature=2.0, direction="reverse")),
    "concept_mass": (concept_ops._concept_mass_op, lambda logits, other: torch.cat([
        (result := fp.concept_mass(logits, fp.ConceptSet.from_ids([[1, 4], [7], [4, 9, 10]]), temperature=0.5)
         ).log_mass.flatten(), result.mass.flatten(), result.lse])),
}


def _recorded_gradient(name, dtype):
    """The output and the gradient of a weighted sum of it w.r.t. the logits."""
    generator = torch.Generator().manual_seed(1)
    logits, other = ((3 * torch.randn(3, 11, generator=generator)).to(dtype) for _ in range(2))
    leaf = logits.requires_grad_()
    value = RECORDED_CALLS[name][1](leaf, other)
    weights = torch.linspace(-1.0, 2.0, value.numel(), dtype=value.dtype).reshape(value.shape)
    (gradient,) = torch.autograd.grad(value, leaf, weights)
    return value.detach(), gradient


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(RECORDED_CALLS))
def test_recorded_eager_call_skips_the_registered_op_and_matches_it(name, dtype, monkeypatch):
    with NoOpFunctionMode():  # a function mode takes the registered op, and torch.library's autograd
        value_through_op, gradient_through_op = _recorded_gradient(name, dtype)
    value, gradient = _recorded_gradient(name, dtype)
    torch.testing.assert_close(value, value_through_op, rtol=0, atol=0)
    torch.testing.assert_close(gradient, gradient_through_op, rtol=0, atol=0)

    def refuse(*args, **kwargs):
        raise AssertionError("the registered op ran")

    monkeypatch.setattr(RECORDED_CALLS[name][0], "op", refuse)
    _recorded_gradient(name, dtype)
    with pytest.raises(AssertionError, match="the registered op ran"), NoOpFunctionMode():
        _recorded_gradient(name, dtype)


def _graph_node_names(value):
    """The class names of the autograd nodes that value's graph holds."""
    names, stack = set(), [value.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and type(node).__name__ not in names:
            names.add(type(node).__name__)
            stack.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize("name", list(RECORDED_CALLS))
def test_recorded_eager_call_names_its_node_as_the_registered_op(name):
    # what tools that read the graph see (grad_fn names, autograd's "output 0 of ..." in its errors)
    with NoOpFunctionMode():
        through_op = _graph_node_names(RECORDED_CALLS[name][1](torch.randn(3, 11).requires_grad_(), torch.randn(3, 11)))
    direct = _graph_node_names(RECORDED_CALLS[name][1](torch.randn(3, 11).requires_grad_(), torch.randn(3, 11)))
    assert any(node.startswith("GeneratedBackwardFor_fastprobe_") for node in through_op)
    assert direct == through_op


def test_plain_call_is_decided_per_argument():
    plain = torch.randn(3)
    assert _common.runs_plain([plain, None, 1.5, "x"])
    assert not _common.runs_plain([torch.randn(3, requires_grad=True)])
    assert _common.runs_plain([torch.randn(3, requires_grad=True)], recorded=True)  # (the caller records it)
    with torch.no_grad():  # no autograd to record: still plain
        assert _common.runs_plain([torch.randn(3, requires_grad=True)])
    assert not _common.runs_plain([torch.empty(3, device="meta")])
    assert not _common.runs_plain([torch.nn.Parameter(torch.randn(3))])  # a subclass
    with NoOpFunctionMode():
        assert not _common.runs_plain([plain])
    with OpLog():
        assert not _common.runs_plain([plain])


def test_meta_tensors_get_shapes_from_the_fake_implementation():
    q, k, v, _ = attention_inputs()
    result = fp.sink_attention(q.to("meta"), k.to("meta"), v.to("meta"), window=4, return_entropy=True)
    assert result.out.device.type == "meta" and result.out.shape == q.shape
    assert result.entropy.shape == q.shape[:3]


DYNAMIC_LENGTH_CALLS = {  # (q, k, v) -> a tensor; neither has a padding mask: the cached key ends are used
    "sink_attention": lambda q, k, v: fp.sink_attention(q, k, v, num_sink=1, window=3).out,
    "dual_path_attention": lambda q, k, v: fp.dual_path_attention(
        q, k, v, torch.arange(k.shape[2]).expand(q.shape[0], -1) % 2 == 1, gamma=0.5, rows="all"),
}


def _qkv(length):
    return torch.randn(2, 2, length, 8), torch.randn(2, 1, length, 8), torch.randn(2, 1, length, 8)


@pytest.mark.parametrize("name", list(DYNAMIC_LENGTH_CALLS))
def test_dynamic_lengths_under_export_and_compile(name):
    """A symbolic sequence length reaches the key ends and guided rows that eager calls cache by
    their sizes: under non-strict torch.export the cache lookup hashed a SymInt (TypeError:
    unhashable type), and torch.compile(dynamic=True) specialized the length to hash it (one
    graph per length for dual_path_attention)."""
    from torch._dynamo.testing import CompileCounter

    call = DYNAMIC_LENGTH_CALLS[name]

    class Module(torch.nn.Module):
        def forward(self, q, k, v):
            return call(q, k, v)

    length = torch.export.Dim("length", min=2, max=64)
    exported = torch.export.export(Module(), _qkv(6), dynamic_shapes=({2: length},) * 3, strict=False).module()
    counter = CompileCounter()
    compiled = torch.compile(call, backend=counter, fullgraph=True, dynamic=True)
    for size in (6, 7, 11):
        inputs = _qkv(size)
        torch.testing.assert_close(exported(*inputs), call(*inputs))
        torch.testing.assert_close(compiled(*inputs), call(*inputs))
    assert counter.frame_count == 1


def _layout(tensors):
    return [None if t is None else (tuple(t.shape), t.stride(), t.dtype) for t in tensors]


META_CALLS = {  # (tensors on a device, that device) -> (outputs, [gradients])
    "bridge_loss": lambda x, device: (lambda loss: (loss, torch.autograd.grad(loss.sum(), x[0])))(
        fp.bridge_loss(x[0], x[1], beta=0.5, reduction="none", labels=torch.tensor([1, -100, 2, 0, 3], device=device))),
    "draft_divergence": lambda x, device: (fp.draft_divergence(torch.stack([x[0], x[1]]).detach(), x[1],
                                                               weights=[0.25, 0.75]), ()),
    "concept_mass": lambda x, device: (lambda result: (result, torch.autograd.grad(result.log_mass.sum(), x[0])))(
        fp.concept_mass(x[0], _concepts().to(device), temperature=0.7)),
    "sink_attention": lambda x, device: (fp.sink_attention(
        *x[2:], num_sink=1, window=3, return_entropy=True, key_groups=torch.arange(11, device=device).expand(2, 11) % 3,
        num_groups=3, key_padding_mask=(torch.arange(11, device=device) > 0).to(torch.int64).expand(2, 11)), ()),
    "dual_path_attention": lambda x, device: (fp.dual_path_attention(
        *x[2:], torch.arange(11, device=device).expand(2, 11) % 3 == 1, gamma=0.5, return_paths=True), ()),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("name", list(META_CALLS))
def test_meta_tensors_give_the_real_layouts(name, dtype):
    """On meta tensors (shape propagation: no data) every op gives outputs and gradients of the
    real call's shapes, strides and dtypes. The checks that read data (finite rows, 0/1 masks,
    group ids, weights) are skipped there: draft_divergence and concept_mass raised torch's
    "Tensor.item() cannot be called on meta tensors", sink_attention did with integer masks."""
    logits = [torch.randn(5, 7, dtype=dtype, requires_grad=True), torch.randn(5, 7, dtype=dtype)]
    qkv = [torch.randn(2, 4, 5, 8, dtype=dtype), torch.randn(2, 2, 11, 8, dtype=dtype), torch.randn(2, 2, 11, 6, dtype=dtype)]
    real = META_CALLS[name](logits + qkv, "cpu")
    meta = [x.detach().to("meta").requires_grad_(x.requires_grad) for x in logits + qkv]
    got = META_CALLS[name](meta, "meta")
    for real_part, meta_part in zip(real, got):
        real_part, meta_part = [real_part] if isinstance(real_part, torch.Tensor) else real_part, \
            [meta_part] if isinstance(meta_part, torch.Tensor) else meta_part
        assert _layout(meta_part) == _layout(real_part)
        assert all(t is None or t.is_meta for t in meta_part)


def test_autograd_still_reaches_the_forward_only_error():
    q, k, v, _ = attention_inputs()
    out = fp.sink_attention(q.requires_grad_(), k, v).out
    with pytest.raises(RuntimeError, match="forward-only"):
        out.sum().backward()
    # a learned sink logit (a model's parameter) alone: the message names it among what to detach
    out = fp.sink_attention(q.detach(), k, v, sink_logit=torch.zeros(4, requires_grad=True)).out
    with pytest.raises(RuntimeError, match="forward-only.*detach q, k, v and sink_logit"):
        out.sum().backward()


def test_check_finite_lse_names_the_first_bad_row_and_only_a_bad_one():
    """One sum decides; a non-finite sum is looked at row by row, so finite rows whose sum
    overflows (float32 lse ~3e38) pass and the first -inf, +inf or NaN row is named."""
    _common.check_finite_lse(torch.tensor([3e38, 3e38, -1.0]), lambda row: f"row {row}")
    _common.check_finite_lse(torch.zeros(0, dtype=torch.float64), lambda row: f"row {row}")
    for bad in (float("-inf"), float("inf"), float("nan")):
        lse = torch.tensor([[0.5, 2.0, 1.0], [3.0, bad, bad]], dtype=torch.float64)
        with pytest.raises(ValueError, match=r"^row \(1, 1\) has no finite log-sum-exp"):
            _common.check_finite_lse(lse, lambda *index: f"row {index}")


# ---------------------------------------------------------------- autograd modes the ops do not have

def _concepts():
    return fp.ConceptSet.from_ids([[1, 4], [2], [0, 3, 5]])


FORWARD_MODE_CALLS = {  # (name, f(x) -> a tensor, input)
    "bridge_loss": (lambda x: fp.bridge_loss(x, x.detach().flip(0), beta=0.5), torch.randn(3, 7)),
    "concept_mass": (lambda x: fp.concept_mass(x, _concepts()).log_mass, torch.randn(3, 7)),
    "draft_divergence": (lambda x: fp.draft_divergence(x, x[0].detach()).jsd, torch.randn(2, 3, 7)),
    "sink_attention": (lambda q: fp.sink_attention(q, q.detach(), q.detach()).out, torch.randn(1, 2, 5, 4)),
    "dual_path_attention": (lambda q: fp.dual_path_attention(q, q.detach(), q.detach(), torch.arange(5)[None] % 2 == 0,
                                                             gamma=0.5), torch.randn(1, 2, 5, 4)),
}


@pytest.mark.parametrize("name", list(FORWARD_MODE_CALLS))
def test_forward_mode_and_func_grad_are_refused_by_name(name):
    """torch.func.jvp / grad and forward-AD dual tensors would drop the tangent (a silent 0) or
    fail deep in torch: refused with the op's name. vmap still runs, and matches a loop."""
    import torch.autograd.forward_ad as forward_ad

    call, x = FORWARD_MODE_CALLS[name]
    refused = f"fastprobe.{name} supports reverse-mode autograd only"
    with pytest.raises(NotImplementedError, match=refused):
        torch.func.jvp(call, (x,), (torch.ones_like(x),))
    with pytest.raises(NotImplementedError, match=refused):
        torch.func.grad(lambda x: call(x).sum())(x)
    with pytest.raises(NotImplementedError, match=r"not torch\.func\.grad / vjp / jvp"):  # (reverse mode too, named)
        torch.func.vjp(call, x)
    with forward_ad.dual_level(), pytest.raises(NotImplementedError, match=refused):
        call(forward_ad.make_dual(x, torch.ones_like(x)))
    with forward_ad.dual_level():  # a dual level alone, no dual tensor: runs
        torch.testing.assert_close(call(x), call(x.clone()))
    batched = torch.stack([x, x * 2 - 1])
    torch.testing.assert_close(torch.func.vmap(call)(batched), torch.stack([call(x) for x in batched]))


def test_vmap_of_an_all_masked_row_gives_nan_instead_of_the_host_check():
    """Under vmap the finite-lse check (a host sync) cannot run: such a row's statistics are NaN,
    as under torch.compile."""
    logits = torch.randn(2, 3, 7)
    logits[1, 2] = float("-inf")
    result = torch.func.vmap(lambda x: fp.concept_mass(x, _concepts()).mass)(logits)
    assert result[1, 2].isnan().all() and result[1, :2].isfinite().all() and result[0].isfinite().all()
    jsd = torch.func.vmap(lambda x: fp.draft_divergence(x[None]).jsd)(logits)
    assert jsd[1, 2].isnan() and jsd[1, :2].isfinite().all()


VMAP_INDEX_CALLS = {  # (q, k, v, ids [B, Lk] int64) -> a tensor: integer masks and ids, checked by a host sync in eager
    "padding mask": lambda q, k, v, ids: fp.sink_attention(q, k, v, key_padding_mask=ids.clamp(max=1)).out,
    "key groups": lambda q, k, v, ids: fp.sink_attention(q, k, v, key_groups=ids, num_groups=3).group_mass,
    "segment ids": lambda q, k, v, ids: fp.sink_attention(q, k, v, segment_ids=ids.cummax(-1).values).out,
    "blocks": lambda q, k, v, ids: fp.sink_attention(q, k, v, bidirectional_blocks=ids.cummax(-1).values - 1).out,
    "dual padding and rows": lambda q, k, v, ids: fp.dual_path_attention(
        q, k, v, ids == 2, gamma=0.5, key_padding_mask=ids.clamp(max=1), rows=ids[:, -q.shape[2]:].clamp(max=1)),
}


@pytest.mark.parametrize("name", list(VMAP_INDEX_CALLS))
def test_vmap_of_attention_with_integer_masks_and_ids(name):
    """Under vmap the 0/1 and id-range checks (host syncs) cannot run, and are skipped as under
    torch.compile; they made vmap fail in torch ("data-dependent control flow")."""
    call = VMAP_INDEX_CALLS[name]
    q, k, v = torch.randn(3, 1, 2, 5, 4), torch.randn(3, 1, 1, 5, 4), torch.randn(3, 1, 1, 5, 4)
    ids = torch.tensor([[0, 1, 1, 2, 2], [1, 1, 2, 2, 2], [1, 2, 2, 2, 2]])[:, None]
    batched = torch.func.vmap(call)(q, k, v, ids)
    torch.testing.assert_close(batched, torch.stack([call(*inputs) for inputs in zip(q, k, v, ids)]))


def test_vmap_needs_num_groups_with_key_groups():
    q = torch.randn(2, 1, 1, 5, 4)
    with pytest.raises(ValueError, match=r"num_groups must be given where key_groups cannot be read \(torch.compile, torch.func.vmap"):
        torch.func.vmap(lambda q, ids: fp.sink_attention(q, q, q, key_groups=ids).group_mass)(q, torch.zeros(2, 1, 5, dtype=torch.int64))


FORWARD_ONLY = ("sink_attention", "dual_path_attention", "draft_divergence")


@pytest.mark.parametrize("name", FORWARD_ONLY)
def test_compiled_forward_only_op_runs_on_inputs_that_require_grad(name):
    """torch.compile traces the backward of a forward whose inputs require grad (a model in eval
    mode with trainable weights): the forward runs as in eager, and only a backward is refused."""
    call, x = FORWARD_MODE_CALLS[name]
    x = x.requires_grad_()
    eager = call(x)
    torch._dynamo.reset()
    compiled = torch.compile(call, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(compiled, eager, equal_nan=True)
    with pytest.raises(RuntimeError, match=f"fastprobe.{name} is forward-only"):
        compiled.sum().backward()


def test_bridge_loss_under_vmap_keeps_its_gradient():
    """Inside vmap the student's batched tensor says requires_grad False: the gradient was not
    computed and the backward raised ("did not require grad")."""
    student, teacher = torch.randn(3, 4, 19, requires_grad=True), torch.randn(3, 4, 19)
    losses = torch.func.vmap(lambda s, t: fp.bridge_loss(s, t, beta=0.5))(student, teacher)
    (got,) = torch.autograd.grad(losses.sum(), student)
    (expected,) = torch.autograd.grad(sum(fp.bridge_loss(s, t, beta=0.5) for s, t in zip(student, teacher)), student)
    torch.testing.assert_close(got, expected)
    torch._dynamo.reset()
    compiled = torch.compile(torch.func.vmap(lambda s, t: fp.bridge_loss(s, t, beta=0.5)), backend="aot_eager")
    (got,) = torch.autograd.grad(compiled(student, teacher).sum(), student)
    torch.testing.assert_close(got, expected)


BATCHED_GRAD_CALLS = {  # (name, f(x [3, 11]) -> a tensor with a backward)
    "concept_mass log_mass": lambda x: fp.concept_mass(x, _concepts()).log_mass,
    "concept_mass mass and lse": lambda x: (lambda r: r.mass * 2 + r.lse[:, None])(fp.concept_mass(x, _concepts())),
    "bridge_loss none": lambda x: fp.bridge_loss(x, x.detach().flip(0), beta=0.3, reduction="none"),
    "bridge_loss mean bfloat16": lambda x: fp.bridge_loss(x.bfloat16(), x.detach().flip(0), beta=0.3).float(),
    "FusedLinearBridgeLoss": lambda x: fp.FusedLinearBridgeLoss(beta=0.3)(
        x[:, :6], torch.arange(66.0).reshape(11, 6).cos(), x.detach()[:, 5:], torch.arange(66.0).reshape(11, 6).sin()),
}


@pytest.mark.parametrize("name", list(BATCHED_GRAD_CALLS))
def test_batched_incoming_gradients(name):
    """torch.autograd.grad(is_grads_batched=True) (jacobian(vectorize=True)) hands the backward
    torch's own batched tensors: the kernels read no storage there, and out= / in-place products
    have no batching rule. Equal to one backward per vector."""
    call = BATCHED_GRAD_CALLS[name]
    x = torch.randn(3, 11, requires_grad=True)
    out = call(x)
    vectors = torch.randn(4, *out.shape)
    if KNOWS_KEPT_GRAPH or name != "FusedLinearBridgeLoss":
        expected = torch.stack([torch.autograd.grad(out, x, vector, retain_graph=True)[0] for vector in vectors])
    else:  # (torch 2.4: the fused loss refuses a second backward through one graph, README)
        expected = torch.stack([torch.autograd.grad(call(x), x, vector)[0] for vector in vectors])
    (got,) = torch.autograd.grad(out, x, vectors, is_grads_batched=True)
    torch.testing.assert_close(got, expected)
    (fresh,) = torch.autograd.grad(call(x), x, vectors, is_grads_batched=True)  # (a graph not kept)
    torch.testing.assert_close(fresh, expected)


def test_fake_tensor_mode_propagates_shapes_past_host_checks():
    """Under a bare FakeTensorMode (shape propagation outside torch.compile) the data-dependent
    checks are skipped, as for meta tensors: they raised DataDependentOutputException."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        assert fp.draft_divergence(torch.randn(2, 3, 11), weights=torch.tensor([0.25, 0.75])).jsd.shape == (3,)
        assert fp.concept_mass(torch.randn(3, 11), _concepts()).mass.shape == (3, 3)


# Contexts in which eager autograd runs as it does outside them (not tracing)
EAGER_CONTEXTS = {
    "plain": contextlib.nullcontext,
    "dispatch mode": OpLog,  # (FlopCounterMode, a logging mode)
    "function mode": lambda: NoOpFunctionMode(),
    "forward-AD level": torch.autograd.forward_ad.dual_level,
}


@pytest.mark.parametrize("context", EAGER_CONTEXTS)
@pytest.mark.parametrize("fused", [False, True])
def test_double_backward_through_bridge_loss_is_refused(fused, context):
    """Its gradients are formed in the forward: a second derivative through them would be 0. Refused
    under a dispatch mode or a forward-AD level too (there it once ran, the bridge's Hessian taken
    as 0: a gradient penalty 0.83 off)."""
    student, teacher = torch.randn(4, 9, requires_grad=True), torch.randn(4, 9)
    with EAGER_CONTEXTS[context]():
        if fused:
            weight = torch.randn(9, 5)
            loss = fp.FusedLinearBridgeLoss(beta=0.5)(student[:, :5], weight.requires_grad_(), teacher[:, :5], weight)
            name = "FusedLinearBridgeLoss"
        else:
            loss, name = fp.bridge_loss(student, teacher, beta=0.5), "bridge_loss"
        with pytest.raises(RuntimeError, match=f"fastprobe.{name} has no second derivative"):
            torch.autograd.grad(loss, student, create_graph=True)
        (grad,) = torch.autograd.grad(loss, student, retain_graph=True)  # first order alone: fine
        if fused and not KNOWS_KEPT_GRAPH:  # (torch 2.4 cannot tell the graph is kept: refused, README)
            with pytest.raises(RuntimeError, match="second backward"):
                torch.autograd.grad(loss, student)
            again = grad
        else:
            (again,) = torch.autograd.grad(loss, student)  # (and again through the kept graph)
    assert grad.abs().sum() > 0 and torch.equal(grad, again)


@pytest.mark.parametrize("context", EAGER_CONTEXTS)
def test_a_second_derivative_through_concept_mass_is_refused_by_name(context):
    """Its gradient under create_graph=True is right; a backward through that gradient raises,
    naming the op (torch's own message pointed at register_autograd)."""
    logits = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    with EAGER_CONTEXTS[context]():
        (grad,) = torch.autograd.grad(fp.concept_mass(logits, _concepts()).log_mass.sum(), logits, create_graph=True)
        with pytest.raises(RuntimeError, match="fastprobe.concept_mass has no second derivative"):
            torch.autograd.grad(grad.pow(2).sum(), logits)
    ids, offsets = torch.tensor([1, 4, 2, 0, 3, 5]), torch.tensor([0, 2, 3, 6])  # (_concepts())
    (want,) = torch.autograd.grad(fp.reference.concept_mass(logits, ids, offsets)["log_mass"].sum(), logits)
    torch.testing.assert_close(grad.detach(), want)


def test_fused_linear_bridge_loss_refuses_torch_func_by_name():
    """Its gradients are formed in the forward, outside functorch's view: vmap and grad failed with
    torch's message about setup_context; refused naming the module and what works instead."""
    loss_fn, weight = fp.FusedLinearBridgeLoss(beta=0.5), torch.randn(11, 6, requires_grad=True)
    hidden, teacher = torch.randn(2, 4, 6), torch.randn(4, 6)
    for transform in (lambda: torch.func.vmap(lambda h: loss_fn(h, weight, teacher, weight.detach()))(hidden),
                      lambda: torch.func.grad(lambda w: loss_fn(hidden[0], w, teacher, w.detach()))(weight.detach())):
        with pytest.raises(NotImplementedError, match="FusedLinearBridgeLoss does not run under torch.func"):
            transform()


def test_a_concept_set_made_under_inference_mode_serves_gradients():
    """A ConceptSet built (or moved) under torch.inference_mode, e.g. cached in an evaluation loop,
    then used on logits that require grad: its index tensors are saved for the backward, which
    torch refuses for inference tensors (the error named none of fastprobe's objects)."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    with torch.inference_mode():
        made = [_concepts().to(device) for device in devices]
    for concepts, device in zip(made, devices):
        logits = torch.randn(3, 7, device=device, requires_grad=True)
        fp.concept_mass(logits, concepts).log_mass.sum().backward()
        assert logits.grad.abs().sum() > 0


def test_environment_variables_are_read_on_every_call(monkeypatch):
    """backend.resolve reads FASTPROBE_BACKEND (and the Triton switches) without os.environ.get's
    cost, but every change still takes effect at the next call: os.environ's setters,
    monkeypatch.setenv / delenv, and os.environ replaced by another mapping."""
    from fastprobe import backend

    cpu = torch.device("cpu")
    monkeypatch.delenv("FASTPROBE_BACKEND", raising=False)
    assert backend.get_backend() == "auto"
    monkeypatch.setenv("FASTPROBE_BACKEND", "reference")
    assert backend.resolve(cpu, torch.float32, "op") == "reference"
    os.environ["FASTPROBE_BACKEND"] = "cpp"
    assert backend.get_backend() == "cpp"
    monkeypatch.setenv("FASTPROBE_BACKEND", "fortran")
    with pytest.raises(ValueError, match="FASTPROBE_BACKEND must be one of"):
        backend.get_backend()
    monkeypatch.delenv("FASTPROBE_BACKEND")
    assert backend.get_backend() == "auto"
    monkeypatch.setenv("FASTPROBE_AUTOTUNE", "0")
    assert not backend.autotune_enabled()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.interpreter_enabled()
    monkeypatch.setenv("TRITON_INTERPRET", "")  # (empty: off, as for Triton itself)
    assert not backend.interpreter_enabled()
    monkeypatch.setattr(os, "environ", {"FASTPROBE_BACKEND": "reference", "TRITON_INTERPRET": "0"})
    assert backend.get_backend() == "reference"
    assert not backend.interpreter_enabled() and backend.autotune_enabled()


@pytest.mark.parametrize("name", [3, b"cpp", ["cpp"]], ids=repr)
def test_a_backend_that_is_not_a_string_is_a_type_error(name):
    """set_backend / use_backend given a non-string: a TypeError naming the argument, and the
    backend in force unchanged."""
    before = fp.get_backend()
    with pytest.raises(TypeError, match="backend must be a str"):
        fp.set_backend(name)
    with pytest.raises(TypeError, match="backend must be a str"):
        with fp.use_backend(name):
            pass
    assert fp.get_backend() == before


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64], ids=str)
def test_new_output_like_is_fresh_poisoned_and_laid_out_as_its_model(dtype):
    """new_output_like (an op's second and third statistics, made from the first): the model's
    shape, strides, dtype and device, its own storage, and poisoned under test as new_output is."""
    model = _common.new_output((2, 3, 5), torch.device("cpu"), dtype)
    transposed = model.transpose(0, 2)  # (a dense layout other than the contiguous one keeps its strides)
    for like in (model, transposed):
        other = _common.new_output_like(like)
        assert (other.shape, other.stride(), other.dtype, other.device) == (like.shape, like.stride(), like.dtype,
                                                                             like.device)
        assert other.untyped_storage().data_ptr() != like.untyped_storage().data_ptr()
        assert bool(other.isnan().all() if dtype.is_floating_point else (other == -1).all())


def test_auto_backend_follows_each_device_type():
    """resolve keeps each device's type after the first call (device.type makes a new string
    per read): devices of different types, and of one type with other indices, still get their
    own backend, in any order."""
    from fastprobe import backend

    if backend.get_backend() != "auto":
        pytest.skip("a backend is forced in this run")
    cpu_backend = "cpp" if backend.cpp_status()[0] else "reference"
    cuda_backend = "triton" if backend._triton_installed() and not backend.interpreter_enabled() else "reference"
    expected = {torch.device("cpu"): cpu_backend, torch.device("meta"): "reference",
                torch.device("cuda", 0): cuda_backend, torch.device("cuda", 1): cuda_backend}
    for _ in range(2):
        for device, chosen in [*expected.items(), *reversed(expected.items())]:
            assert backend.resolve(device, torch.float32, "op") == chosen, device
            assert backend.resolve(device, torch.float64, "op") == "reference", device


# ---------------------------------------------------------------- tensors the kernels cannot read as they are

def _calls():
    """Each op's CPU call on one floating input x (the others fixed, seeded): (name, make_x, call)."""
    generator = torch.Generator().manual_seed(0)
    fixed = {shape: torch.randn(*shape, generator=generator) for shape in ((2, 9, 8), (6, 300))}
    k = v = fixed[(2, 9, 8)].reshape(1, 2, 9, 8)
    concepts = fp.ConceptSet.from_ids([[1, 5, 299], [0, 3]])
    drop = torch.zeros(1, 9, dtype=torch.bool)
    drop[0, 2:5] = True
    return [
        ("draft_logits", (3, 5, 37), lambda x: fp.draft_divergence(x).jsd),
        ("logits", (6, 300), lambda x: fp.concept_mass(x, concepts).mass),
        ("student_logits", (6, 300), lambda x: fp.bridge_loss(x, fixed[(6, 300)], beta=0.5)),
        ("teacher_logits", (6, 300), lambda x: fp.bridge_loss(fixed[(6, 300)], x, beta=0.5)),
        ("q", (1, 4, 5, 8), lambda x: fp.sink_attention(x, k, v).out),
        ("q", (1, 4, 5, 8), lambda x: fp.dual_path_attention(x, k, v, drop, gamma=1.0)),
    ]


@pytest.mark.parametrize("case", range(6))
def test_a_negative_view_is_read_with_its_sign(case):
    """x.conj().imag of a complex tensor is a float view whose storage holds -x (the negative bit):
    the kernels read storage through data pointers, so they gave the results of -x."""
    name, shape, call = _calls()[case]
    x = torch.randn(*shape, dtype=torch.complex64).conj().imag
    assert x.is_neg()
    torch.testing.assert_close(call(x), call(x.clone()), rtol=0, atol=0)


@pytest.mark.parametrize("case", range(6))
def test_sparse_inputs_are_refused_by_name(case):
    name, shape, call = _calls()[case]
    with pytest.raises(TypeError, match=rf"{name} must be a dense \(strided\) tensor, got layout torch.sparse_coo"):
        call(torch.randn(*shape).to_sparse())


@pytest.mark.parametrize("case", range(6))
def test_misaligned_data_is_refused_before_the_kernel_reads_it(case):
    """A tensor whose data pointer is not a multiple of its element size (torch.frombuffer at an
    odd byte offset): reading it as floats is undefined behaviour, so the C++ kernels refuse it."""
    name, shape, call = _calls()[case]
    count = int(torch.Size(shape).numel())
    x = torch.frombuffer(bytearray(4 * count + 4), dtype=torch.float32, count=count, offset=1).view(shape)
    x.copy_(torch.randn(shape))
    assert x.data_ptr() % 4
    with fp.use_backend("cpp"), pytest.raises(ValueError, match="is not aligned to its 4-byte elements"):
        call(x)


def test_integer_options_of_other_integral_types_become_plain_ints():
    """An integer option given as another Integral (a numpy integer, an IntEnum) is checked as an
    int and handed on as a plain int (what the custom ops' int arguments and the modules' options
    hold), e.g. prepare_key_groups' num_groups and BridgeLoss's total_steps; bools and
    non-integers are refused by name."""
    import enum

    import numpy

    class Size(enum.IntEnum):
        FOUR = 4

    for value in (numpy.int64(4), numpy.uint8(4), Size.FOUR):
        checked = _common.check_int(value, "total", 1)
        assert type(checked) is int and checked == 4
    assert type(attention.prepare_key_groups(torch.zeros(1, 6, dtype=torch.long), numpy.int32(3)).num_groups) is int
    assert type(fp.BridgeLoss(beta_start=0.0, beta_end=1.0, total_steps=numpy.int64(4)).total_steps) is int
    with pytest.raises(ValueError, match="total must be >= 1, got 0"):
        _common.check_int(numpy.int64(0), "total", 1)
    with pytest.raises(ValueError, match=r"total must be < 2\*\*63 \(an int64\), got 18446744073709551615"):
        _common.check_int(numpy.uint64(2**64 - 1), "total", 1)
    for value in (True, numpy.float64(4.0), "4"):
        with pytest.raises(TypeError, match="total must be an integer >= 1"):
            _common.check_int(value, "total", 1)


@pytest.mark.parametrize("forced, device, interpret, triton, cpp_import, message", [
    ("cpp", "cuda", "0", True, (True, ""), "op: backend 'cpp' runs on CPU tensors, got cuda tensors"),
    ("cpp", "cpu", "0", True, (False, "no extension"), "op: backend 'cpp' is not available: no extension"),
    ("triton", "cpu", "0", False, (True, ""), "op: backend 'triton' cannot run on cpu tensors: triton is not installed"),
    ("triton", "cuda", "1", True, (True, ""),
     "op: backend 'triton' cannot run on cuda tensors: TRITON_INTERPRET=1 is set, so Triton runs on CPU tensors only"),
    ("triton", "meta", "1", True, (True, ""), "op: backend 'triton' cannot run on meta tensors: no Triton path for meta"),
], ids=["cpp-on-cuda", "cpp-missing", "triton-missing", "triton-interpreter-on-cuda", "triton-on-meta"])
def test_a_forced_backend_that_cannot_run_the_call_says_why(forced, device, interpret, triton, cpp_import, message,
                                                             monkeypatch):
    """A forced backend raises instead of falling back, naming the op and why it cannot run there
    (the device type, a missing extension or package, the interpreter's CPU-only rule)."""
    from fastprobe import backend

    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    monkeypatch.setattr(backend, "_triton_installed", lambda: triton)
    monkeypatch.setattr(backend, "_cpp_import", lambda: cpp_import)
    monkeypatch.setattr(backend, "_warn_no_cpp", lambda: None)
    with fp.use_backend(forced), pytest.raises(RuntimeError, match=f"^{message}"):
        backend.resolve(torch.device(device), torch.float32, "op")


def _dtensor_calls(local):
    """(the argument made a DTensor, the op called with it) for each op: its logits or q, and a
    tensor argument of another kind (labels, weights, a mask). `local(t)` gives the argument."""
    torch.manual_seed(0)
    logits, target, drafts = torch.randn(5, 11, requires_grad=True), torch.randn(5, 11), torch.randn(3, 5, 11)
    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    keys = torch.ones(1, 4, dtype=torch.bool)
    concepts = fp.ConceptSet.from_ids([[1, 2], [3]])
    return [
        ("student_logits", lambda: fp.bridge_loss(local(logits), target, beta=0.5)),
        ("teacher_logits", lambda: fp.bridge_loss(logits, local(target), beta=0.5)),
        ("labels", lambda: fp.bridge_loss(logits, target, beta=0.5, labels=local(torch.zeros(5, dtype=torch.long)))),
        ("draft_logits", lambda: fp.draft_divergence(local(drafts))),
        ("target_logits", lambda: fp.draft_divergence(drafts, local(target))),
        ("weights", lambda: fp.draft_divergence(drafts, weights=local(torch.ones(3) / 3))),
        ("logits", lambda: fp.concept_mass(local(target), concepts)),
        ("q", lambda: fp.sink_attention(local(q), k, v)),
        ("v", lambda: fp.sink_attention(q, k, local(v))),
        ("key_padding_mask", lambda: fp.sink_attention(q, k, v, key_padding_mask=local(keys))),
        ("k", lambda: fp.dual_path_attention(q, local(k), v, ~keys, gamma=0.5)),
        ("drop_keys", lambda: fp.dual_path_attention(q, k, v, local(~keys), gamma=0.5)),
    ]


def test_a_dtensor_argument_is_refused_by_name(one_rank_group):
    """A DTensor (torch.distributed's sharded or replicated tensor) passed to an op: a TypeError
    naming the argument and the way out, before any kernel runs (torch's dispatcher said "got
    mixed torch.Tensor and DTensor" or "does not have a sharding strategy registered", naming
    neither: now the refusal's cause); the op's result from the local tensors is unchanged."""
    tensor_module = pytest.importorskip("torch.distributed.tensor")
    if not hasattr(tensor_module, "distribute_tensor"):  # (torch 2.4: DTensor is in torch.distributed._tensor)
        tensor_module = pytest.importorskip("torch.distributed._tensor")
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (1,))
    for name, call in _dtensor_calls(lambda t: tensor_module.distribute_tensor(t, mesh, [tensor_module.Replicate()])):
        with pytest.raises(TypeError, match=rf"(^|: ){name} is a DTensor \(placements \(Replicate\(\),\)\); .*"
                                            r"\.full_tensor\(\)") as refused:
            call()
        # (torch's dispatcher error, where there was one, is the refusal's cause, not an error in handling it)
        assert refused.value.__context__ is None or refused.value.__cause__ is refused.value.__context__, name
    for name, call in _dtensor_calls(lambda t: t):  # (the same calls on local tensors run)
        call()
