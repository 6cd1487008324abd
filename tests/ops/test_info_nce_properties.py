"""Property-based: random shapes and option combinations, fused backends against naive."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastcl

from .test_info_nce import BACKENDS, assert_matches, make_inputs


@st.composite
def problems(draw):
    batch = draw(st.integers(1, 12))
    symmetric = draw(st.booleans())
    num_keys = draw(st.integers(batch if symmetric else 1, 16))
    normalize = draw(st.booleans())
    # D = 1 with normalize maps every vector to +-1: its gradient is pure rounding noise
    dim = draw(st.integers(2 if normalize else 1, 20))
    mode = draw(st.sampled_from(["mask", "mask", "supcon", "pairwise"]))
    use_labels = mode != "mask" or draw(st.booleans())
    hard = draw(st.integers(0, 3))
    query, key, extra = make_inputs(batch, num_keys, dim, hard=hard, labels=draw(st.integers(1, 4)) if use_labels else 0,
                                    seed=draw(st.integers(0, 10_000)))
    kwargs = dict(extra, normalize=normalize, symmetric=symmetric, multi_positive=mode,
                  reduction=draw(st.sampled_from(["mean", "sum", "none"])))
    if mode == "mask":
        if not symmetric and (num_keys < batch or draw(st.booleans())):
            kwargs["positive"] = torch.randint(0, num_keys, (batch,), generator=torch.Generator().manual_seed(batch))
            if draw(st.booleans()) and num_keys > 1:
                rows = torch.arange(batch)
                positive = kwargs["positive"]
                kwargs["positive"] = torch.where(positive == rows, (positive + 1) % num_keys, positive)
                kwargs["exclude_self"] = True
        if draw(st.booleans()):
            kwargs["false_negative_margin"] = draw(st.floats(-0.5, 1.0))
        if draw(st.booleans()):
            kwargs["label_smoothing"] = draw(st.floats(0.0, 0.5))
    elif not symmetric:
        kwargs["exclude_self"] = draw(st.booleans())
    return query, key, kwargs


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems(), block_rows=st.sampled_from([None, "1", "3"]))
def test_random_problems_match_naive(backend, problem, block_rows):
    query, key, kwargs = problem
    import os

    previous = os.environ.pop("FASTCL_BLOCK_ROWS", None)
    if block_rows:
        os.environ["FASTCL_BLOCK_ROWS"] = block_rows
    try:
        assert_matches(backend, query, key, **kwargs)
    finally:
        os.environ.pop("FASTCL_BLOCK_ROWS", None)
        if previous is not None:
            os.environ["FASTCL_BLOCK_ROWS"] = previous
