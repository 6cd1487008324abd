"""Bad input gets a clear error naming the argument and what was expected."""
import pytest
import torch

import fastcl

Q = torch.randn(4, 8)
K = torch.randn(6, 8)


@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [
        ((Q[0], K), {}, ValueError, r"query must have shape \(B, D\)"),
        ((Q, K[:, :5]), {}, ValueError, r"key must have shape \(N, D\) with D = query.shape\[1\] = 8"),
        ((Q.long(), K), {}, TypeError, "query must be float16, bfloat16, float32 or float64"),
        (([1.0], K), {}, TypeError, "query must be a torch.Tensor"),
        ((Q[:0], K), {}, ValueError, "query is empty"),
        ((Q, K), dict(positive=torch.tensor([0, 1, 2, 6])), ValueError, r"positive must index key rows in \[0, N\) = \[0, 6\)"),
        ((Q, K), dict(positive=torch.tensor([0, 1, 2, -1])), ValueError, "positive must index key rows"),
        ((Q, K), dict(positive=torch.tensor([0.0, 1, 2, 3])), TypeError, "positive must be an integer tensor"),
        ((Q, K), dict(positive=torch.tensor([0, 1, 2])), ValueError, r"positive must have shape \(B,\) = \(4,\)"),
        ((Q, K[:3]), {}, ValueError, "default positive arange\\(B\\) needs N >= B"),
        ((Q, K), dict(temperature=0.0), ValueError, "temperature must be a finite value > 0"),
        ((Q, K), dict(temperature=-1.0), ValueError, "temperature must be a finite value > 0"),
        ((Q, K), dict(temperature=torch.tensor(-0.5)), ValueError, "temperature must be a finite value > 0"),
        ((Q, K), dict(temperature=torch.ones(2)), ValueError, "temperature must be a float or a scalar tensor"),
        ((Q, K), dict(temperature="hot"), TypeError, "temperature must be a float"),
        ((Q, K), dict(symmetric=True, positive=torch.arange(4)), ValueError, "positive must be None when symmetric"),
        ((Q, K[:3]), dict(symmetric=True), ValueError, "symmetric=True needs at least B keys"),
        ((Q, K), dict(reduction="avg"), ValueError, "reduction must be one of"),
        ((Q, K), dict(backend="metal"), ValueError, "backend must be one of"),
        ((Q, K), dict(multi_positive="all"), ValueError, "multi_positive must be one of"),
        ((Q, K), dict(exclude_self=True), ValueError, "exclude_self=True drops logit"),
        ((Q, K), dict(exclude_self=True, positive=torch.tensor([1, 0, 0, 3])), ValueError, r"positive\[3\] == 3"),
        ((Q, K), dict(labels=torch.zeros(4, dtype=torch.long)), ValueError, "labels .* and key_labels .* must be given together"),
        ((Q, K), dict(labels=torch.zeros(3, dtype=torch.long), key_labels=torch.zeros(6, dtype=torch.long)), ValueError, r"labels must have shape \(B,\)"),
        ((Q, K), dict(labels=torch.zeros(4), key_labels=torch.zeros(6)), TypeError, "labels must be an integer tensor"),
        ((Q, K), dict(multi_positive="supcon"), ValueError, "takes its positives from labels"),
        ((Q, K), dict(multi_positive="supcon", labels=torch.zeros(4, dtype=torch.long), key_labels=torch.zeros(6, dtype=torch.long),
                      positive=torch.arange(4)), ValueError, "positive must be None with multi_positive"),
        ((Q, K), dict(multi_positive="pairwise", labels=torch.zeros(4, dtype=torch.long), key_labels=torch.zeros(6, dtype=torch.long),
                      label_smoothing=0.1), ValueError, "label_smoothing is only defined"),
        ((Q, K), dict(multi_positive="supcon", labels=torch.zeros(4, dtype=torch.long), key_labels=torch.zeros(6, dtype=torch.long),
                      false_negative_margin=0.1), ValueError, "false_negative_margin compares"),
        ((Q, K), dict(label_smoothing=1.0), ValueError, r"label_smoothing must be in \[0, 1\)"),
        ((Q, K), dict(false_negative_margin=float("nan")), ValueError, "false_negative_margin must be a number"),
        ((Q, K), dict(hard_negatives=torch.randn(4, 8)), ValueError, r"hard_negatives must have shape \(B, H, D\)"),
        ((Q, K), dict(hard_negatives=torch.randn(3, 2, 8)), ValueError, r"hard_negatives must have shape \(B, H, D\) = \(4, H, 8\)"),
        ((Q, K.to("meta")), {}, ValueError, "same device"),
    ],
)
def test_bad_input(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        fastcl.info_nce(*args, **kwargs)


def test_explicit_unavailable_backend_raises():
    if fastcl.backends()["cuda"].available:
        pytest.skip("CUDA backend available here")
    with pytest.raises(RuntimeError, match="backend='cuda' is not available here"):
        fastcl.info_nce(Q, K, backend="cuda")


def test_wrapper_errors():
    with pytest.raises(ValueError, match="image_features and text_features must have the same shape"):
        fastcl.clip_loss(Q, K, 10.0)
    with pytest.raises(ValueError, match="logit_scale must be a finite value > 0"):
        fastcl.clip_loss(Q, Q, 0.0)
    with pytest.raises(ValueError, match="z1 and z2 must have the same shape"):
        fastcl.nt_xent(Q, K)
    with pytest.raises(ValueError, match="logit_bias must be a float or a scalar tensor"):
        fastcl.siglip_loss(Q, Q, 10.0, torch.zeros(3))
    with pytest.raises(TypeError, match="image_features must be float16"):
        fastcl.siglip_loss(Q.long(), Q.long(), 10.0, -10.0)
