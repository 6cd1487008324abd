"""nn.Module wrappers: options forwarded, learnable temperature gets its gradient, clamped."""
import math

import torch

import fastcl
from fastcl.ops.info_nce import naive
from fastcl.ops.siglip import naive as siglip_naive


def test_info_nce_loss_module_forwards_options():
    query, key = torch.randn(6, 8), torch.randn(9, 8)
    labels, key_labels = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    module = fastcl.InfoNCELoss(temperature=0.2, normalize=True, label_smoothing=0.1, reduction="none")
    expected = naive.info_nce(query, key, temperature=0.2, normalize=True, label_smoothing=0.1, reduction="none",
                              labels=labels, key_labels=key_labels)
    torch.testing.assert_close(module(query, key, labels=labels, key_labels=key_labels), expected)
    assert "temperature=0.2" in repr(module)


def test_learnable_temperature_gradient_and_clamp():
    query, key = torch.randn(6, 8), torch.randn(6, 8)
    module = fastcl.InfoNCELoss(temperature=0.07, learnable_temperature=True, symmetric=True)
    assert math.isclose(module.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)
    module(query, key).backward()
    scale = module.logit_scale.detach().clone().requires_grad_()
    naive.info_nce(query, key, temperature=1 / scale.exp(), symmetric=True).backward()
    torch.testing.assert_close(module.logit_scale.grad, scale.grad)
    with torch.no_grad():
        module.logit_scale.fill_(math.log(1000.0))
    torch.testing.assert_close(module.current_temperature(), torch.tensor(0.01))  # scale clamped to 100
    module.logit_scale.grad = None
    module(query, key).backward()
    assert module.logit_scale.grad == 0  # clamped: no gradient, as CLIP's in-place clamp


def test_siglip_module_parameters_learn():
    module = fastcl.SigLipLoss()
    image, text = torch.randn(5, 4), torch.randn(5, 4)
    loss = module(image, text)
    loss.backward()
    assert module.logit_scale.grad is not None and module.logit_bias.grad is not None
    expected = siglip_naive.siglip_loss(image, text, torch.tensor(10.0), torch.tensor(-10.0))
    torch.testing.assert_close(loss, expected)
