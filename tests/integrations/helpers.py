"""Shared helpers of the adapter tests: gradients of a loss, the adapters' tolerance."""
import contextlib
import sys

import torch

LOSS_RTOL = 1e-5
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)


def loss_and_grads(fn, *tensors):
    """(loss, [grad of each tensor]) of fn on fresh leaf copies of ``tensors``."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    loss = fn(*leaves)
    loss.backward()
    return loss.detach(), [leaf.grad for leaf in leaves]


def assert_same(ours, theirs):
    torch.testing.assert_close(ours[0].double(), theirs[0].double(), rtol=LOSS_RTOL, atol=1e-7)
    for a, b in zip(ours[1], theirs[1]):
        assert (a is None) == (b is None)
        if a is not None:
            scale = max(1.0, float(b.abs().max()))
            torch.testing.assert_close(a, b, rtol=GRAD_TOL["rtol"], atol=GRAD_TOL["atol"] * scale)


# fastcl's own keywords, allowed after the peer's parameters, keyword-only
FASTCL_KEYWORDS = ("distributed_mode",)


def assert_same_signature(ours, theirs):
    """Same parameter names, kinds and defaults (annotations may be strings on one side), but
    for fastcl's own keyword-only extensions (:data:`FASTCL_KEYWORDS`) at the end of ours."""
    import inspect

    def shape(fn):
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

    mine = shape(ours)
    while mine and mine[-1][0] in FASTCL_KEYWORDS:
        assert mine[-1][1] == inspect.Parameter.KEYWORD_ONLY, (ours, mine[-1])
        mine.pop()
    assert mine == shape(theirs), (ours, theirs)


@contextlib.contextmanager
def restored_modules(names):
    """Puts ``sys.modules[name]`` for every name back as it was on exit (a peer loaded from its
    files beside stubs must not leak into the other tests)."""
    saved = {name: sys.modules.get(name) for name in names}
    try:
        yield saved
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
