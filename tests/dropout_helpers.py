"""Models left in train mode with strong dropout, for the tests that the methods measure in eval
mode and give every module its own training flag back."""

import pytest
import torch

DROPOUT = 0.5  # large: a forward with dropout on is far from the one without


def with_dropout(model, p: float = DROPOUT):
    """model with dropout p everywhere it has dropout (nn.Dropout modules, and the attention
    dropout rates transformers keeps as float attributes: Llama's attention_dropout, CLIP's
    dropout), in train mode but for a few submodules left in eval mode (mixed flags, which must
    come back as they were); returns the model."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
        for name in ("attention_dropout", "dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, p)
    model.train()
    leaves = [module for module in model.modules() if not list(module.children())]
    for module in leaves[::3]:  # (some of the dropout modules among them: their own choice, kept)
        module.eval()
    return model


def training_flags(model) -> dict:
    """{submodule name: its training flag}."""
    return {name: module.training for name, module in model.named_modules()}


class Raised(Exception):
    """What the failing_forward hook raises."""


def failing_forward(model, module=None):
    """A forward hook on `module` (default: model's last leaf module) that raises Raised (after the
    method has put the model in eval mode); returns its handle."""
    leaf = module if module is not None else [module for module in model.modules() if not list(module.children())][-1]

    def fail(module, args, output):
        raise Raised("a forward failed")

    return leaf.register_forward_hook(fail)


def check_eval_mode(models, measure, compare, raise_in=None) -> None:
    """measure() (a method's call on `models`, left in train mode by with_dropout) leaves every
    module's training flag as it was, also when a forward raises inside it, and gives what it
    gives with the models in eval mode (compare(got, wanted) asserts it); the models end in eval
    mode. raise_in: the module whose forward raises (default: each model's last leaf; give one
    that runs when the method stops before the last leaf)."""
    before = [training_flags(model) for model in models]
    got = measure()
    assert [training_flags(model) for model in models] == before
    handles = [failing_forward(model, raise_in) for model in models]
    try:
        with pytest.raises(Raised):
            measure()
    finally:
        for handle in handles:
            handle.remove()
    assert [training_flags(model) for model in models] == before
    for model in models:
        model.eval()
    compare(got, measure())
