"""torch.compile(fullgraph=True) through fastcl.info_nce, and torch.library.opcheck of the ops.

Every backend runs inside the same custom ops, so each is compiled here: the CPU ones, Triton
(its interpreter on CPU tensors without a GPU, compiled kernels on a GPU) and, on a GPU, the
native CUDA kernels.
"""
import pytest
import torch

import fastcl
from fastcl.ops.info_nce import naive

ON_GPU = torch.cuda.is_available()

pytestmark = [
    # Triton interpreter (numpy) warnings for values the kernels want: log(0) = -inf
    pytest.mark.filterwarnings("ignore:divide by zero encountered in log"),
    pytest.mark.filterwarnings("ignore:overflow encountered in exp"),
]


def _cases():
    available = fastcl.backends()
    cases = [pytest.param("torch", "cpu", id="torch")]
    if available["cpu"].available:
        cases.append(pytest.param("cpu", "cpu", id="cpu"))
    if available["triton"].available:
        # on a GPU also `cuda`: benchmarks/gpu_check.sh runs `pytest -m cuda`
        marks = [pytest.mark.triton] + ([pytest.mark.cuda] if ON_GPU else [])
        cases.append(pytest.param("triton", "cuda" if ON_GPU else "cpu", id="triton", marks=marks))
    cases.append(pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.cuda))
    return cases


CASES = _cases()


def _loss(query, key, hard, temperature, backend):
    return (fastcl.info_nce(query, key, hard_negatives=hard, temperature=temperature, normalize=True, backend=backend)
            + fastcl.info_nce(query, key, temperature=0.2, symmetric=True, reduction="none", backend=backend).sum() * 0.1)


@pytest.mark.parametrize("compiler", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
@pytest.mark.parametrize("backend,device", CASES)
def test_compiled_matches_eager(backend, device, compiler):
    if backend == "cuda" and not fastcl.backends()["cuda"].available:
        pytest.skip(fastcl.backends()["cuda"].reason)
    torch._dynamo.reset()
    query, key, hard = torch.randn(12, 8), torch.randn(15, 8), torch.randn(12, 2, 8)
    outputs = []
    for fn in (_loss, torch.compile(_loss, fullgraph=True, backend=compiler)):
        tensors = [t.to(device).clone().requires_grad_() for t in (query, key, hard)]
        temperature = torch.tensor(0.1, device=device, requires_grad=True)
        loss = fn(*tensors, temperature, backend)
        loss.backward()
        outputs.append((loss.detach(), [t.grad for t in tensors] + [temperature.grad]))
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = outputs
    torch.testing.assert_close(compiled_loss, eager_loss)
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want)
    eager_loss = eager_loss.cpu()
    # and the eager value is the reference value
    expected = (naive.info_nce(query, key, hard_negatives=hard, temperature=0.1, normalize=True)
                + naive.info_nce(query, key, temperature=0.2, symmetric=True, reduction="none").sum() * 0.1)
    torch.testing.assert_close(eager_loss, expected)


@pytest.mark.parametrize("backend,device", [c for c in CASES if c.id != "cuda"])
@pytest.mark.parametrize("compute_grads,reduction", [(True, "mean"), (False, "none"), (False, "sum")])
def test_opcheck(backend, device, compute_grads, reduction):
    query = torch.randn(6, 5, device=device, requires_grad=True)
    key = torch.randn(7, 5, device=device, requires_grad=True)
    hard = torch.randn(6, 2, 5, device=device, requires_grad=True)
    temperature = torch.tensor(0.3, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 0, 1, 2], device=device)
    key_labels = torch.tensor([0, 1, 2, 0, 1, 2, 0], device=device)
    args = (query, key, hard, temperature, None, labels, key_labels, True, False, False, "mask", 0.5, 0.1, reduction,
            backend, compute_grads)
    torch.library.opcheck(torch.ops.fastcl.info_nce_forward.default, args)
    grad_output = (torch.rand(6) if reduction == "none" else torch.tensor(1.5)).to(device)
    back_args = (query.detach(), key.detach(), hard.detach(), temperature.detach(), None, labels, key_labels,
                 grad_output, True, False, False, "mask", 0.5, 0.1, reduction, backend)
    torch.library.opcheck(torch.ops.fastcl.info_nce_backward.default, back_args,
                          test_utils=("test_schema", "test_faketensor"))
