"""Fused latent-attention pooling: token chunks, re-associated attention, recomputing backward.

Four ideas make it cheaper than the eager module in time and memory:

1. **Re-association.** The keys and values depend only on the latents, so per call::

       M = [scale * Wq_h^T K_h^T]_h   (d, H*r)     N = [V_h Wout_h^T]_h   (H*r, d)

   and for the token states x = LN(h): scores = x M (one (n, d) x (d, H*r) product instead of
   the query projection plus H score products) and attention output = P N (one product instead
   of H value products plus ``to_out``). The (tokens x H*dh) queries never exist.
2. **Only pooled tokens are computed.** Every step is per token, and a token with pool weight
   0 (padding, instruction) does not reach the output, so only tokens with ``pool_mask != 0``
   are gathered and processed, in chunks of ``chunk_tokens``.
3. **The last layer is applied after pooling.** The masked mean is linear and each sequence's
   weights sum to 1, so mean_t(y_t + g_t W2^T + b2) = mean_t(y_t) + mean_t(g_t) W2^T + b2: one
   (B, F) x (F, d) product instead of a (tokens, F) x (F, d) one, and in backward dW2 = dpooled^T
   mean(g) and dg_t = w_t (dpooled W2)_seq(t) without per-token products.
4. **Backward recomputes.** The forward pass keeps the inputs, the per-call M, N, K, V, the
   per-(token, head) log-sum-exp of the scores and the attention residual y (tokens x d); the
   backward pass recomputes each chunk's scores, probabilities (exp(s - lse), no second
   reduction) and feed-forward pre-activation. The (tokens x H*r) probabilities and the
   (tokens x 2F) feed-forward activations only ever exist for one chunk.

The elementwise parts (row softmax, its recomputation and backward, GEGLU forward and backward)
are a pluggable :class:`ElementwiseKernels`: PyTorch ops here, C++ in ``native.py``, Triton in
``triton.py``. Matrix products go to torch (MKL / oneDNN / cuBLAS).

Precision: on CPU every chunk is computed in float32 whatever the input dtype; on CUDA the
matrix products run in the input dtype (fp32 accumulation inside cuBLAS) and every statistic
(layer norms, softmax, log-sum-exp, pooled sums, gradient accumulators) is float32.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import torch.nn.functional as F

# Large enough that a chunk's products keep the cores busy between synchronizations (on a shared
# CPU, many small parallel regions cost more than the products), small next to the eager activations.
DEFAULT_CHUNK_BYTES = 32 * 2**20
_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


class ElementwiseKernels:
    """Row softmax and GEGLU in PyTorch ops (any device). Subclasses replace them with kernels.

    The GEGLU is ``value * gelu(gate)`` with exact (erf) GELU.

    Shapes: ``scores`` (rows, r) contiguous, ``lse`` (rows,) float32; ``u`` (n, 2F) with the
    GEGLU value in the first half and the gate in the second; ``grad_gated`` (n, F).
    """

    name = "torch"

    def softmax_forward(self, scores: torch.Tensor) -> torch.Tensor:
        """scores <- softmax(scores) in place; returns the float32 log-sum-exp of each row."""
        lse = torch.logsumexp(_wide(scores), dim=-1)
        scores.copy_(torch.exp(_wide(scores) - lse.unsqueeze(-1)))
        return lse

    def softmax_recompute(self, scores: torch.Tensor, lse: torch.Tensor) -> None:
        """scores <- exp(scores - lse) in place (the probabilities of the forward pass)."""
        scores.copy_(torch.exp(_wide(scores) - lse.unsqueeze(-1)))

    def softmax_backward(self, probs: torch.Tensor, grad: torch.Tensor) -> None:
        """grad <- probs * (grad - sum(probs * grad)) in place: dL/dscores from dL/dprobs."""
        p, g = _wide(probs), _wide(grad)
        grad.copy_(p * (g - (p * g).sum(-1, keepdim=True)))

    def geglu_forward(self, u: torch.Tensor) -> torch.Tensor:
        value, gate = u.chunk(2, dim=-1)
        return (_wide(value) * F.gelu(_wide(gate))).to(u.dtype)

    def geglu_backward(self, u: torch.Tensor, grad_gated: torch.Tensor) -> torch.Tensor:
        """dL/du given dL/dgated: [dg * gelu(gate) | dg * value * gelu'(gate)]."""
        value, gate = (_wide(t) for t in u.chunk(2, dim=-1))
        cdf = 0.5 * (1.0 + torch.erf(gate * _SQRT_HALF))
        grad = _wide(grad_gated)
        gelu_slope = cdf + gate * torch.exp(-0.5 * gate * gate) * _INV_SQRT_2PI
        return torch.cat([grad * gate * cdf, grad * value * gelu_slope], dim=-1).to(u.dtype)


def _wide(tensor: torch.Tensor) -> torch.Tensor:
    """float32 for 16-bit tensors, unchanged for float32 / float64 (float64 is the gradcheck path)."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def compute_dtype(hidden_states: torch.Tensor) -> torch.dtype:
    """dtype of the matrix-product operands (see the module docstring)."""
    if hidden_states.device.type == "cuda" and hidden_states.dtype in (torch.float16, torch.bfloat16):
        return hidden_states.dtype
    return torch.float64 if hidden_states.dtype == torch.float64 else torch.float32


def chunk_tokens_for(width: int, bytes_per_element: int, budget: int = DEFAULT_CHUNK_BYTES) -> int:
    """Tokens per chunk so that one (tokens x width) buffer fits ``budget`` bytes."""
    override = os.environ.get("FASTCL_LATENT_CHUNK_TOKENS")
    if override:
        return max(1, int(override))
    return max(16, budget // max(1, width * bytes_per_element))


def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float):
    """(y, mean, rstd) of a layer norm over the last dimension, in float32 (float64 stays)."""
    x = _wide(x)
    return torch.native_layer_norm(x, (x.shape[-1],), _wide(weight), _wide(bias), eps)


def _layer_norm_backward(grad_y: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                         weight: torch.Tensor, bias: torch.Tensor, grad_weight: torch.Tensor,
                         grad_bias: torch.Tensor) -> torch.Tensor:
    """dL/dx of a layer norm (one fused ATen kernel); adds dL/dweight and dL/dbias into the accumulators."""
    grad_x, dw, db = torch.ops.aten.native_layer_norm_backward(
        _wide(grad_y), _wide(x), [x.shape[-1]], mean, rstd, _wide(weight), _wide(bias), [True, True, True])
    grad_weight += dw
    grad_bias += db
    return grad_x


def _accumulate_product(accumulator: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """accumulator += a @ b without a temporary of the accumulator's size where possible.

    Same dtypes: in-place addmm. 16-bit operands into a float32 accumulator on CUDA: cuBLAS
    reads and writes the float32 accumulator directly (``addmm`` with ``out_dtype``, torch >= 2.8);
    elsewhere (older torch) a 16-bit product is added (one temporary).
    """
    if accumulator.dtype == a.dtype:
        accumulator.addmm_(a, b)
        return
    if accumulator.is_cuda:
        try:
            torch.addmm(accumulator, a, b, out_dtype=accumulator.dtype, out=accumulator)
            return
        except (TypeError, RuntimeError, NotImplementedError):
            pass
    accumulator += _wide(a @ b)


def _wide_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with 16-bit operands (tensor cores) and a float32 result, as flash-attention keeps
    its scores: the attention scores S and their gradients dP are never rounded to 16 bits
    (the softmax backward P * (dP - sum P dP) cancels badly from a bf16 dP). cuBLAS writes the
    float32 product directly (``out_dtype``, torch >= 2.8); elsewhere the operands are widened."""
    if a.dtype not in (torch.float16, torch.bfloat16):
        return a @ b
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            pass
    return a.float() @ b.float()


class _Weights:
    """The parameters in the compute dtype, plus the per-call latent products."""

    def __init__(self, params, num_heads: int, eps: float, dtype: torch.dtype, derived=None):
        (latents, norm_w, norm_b, ctx_w, ctx_b, wq, wkv, wo, ff_norm_w, ff_norm_b, w1, b1, w2, b2) = params
        self.num_heads = num_heads
        self.eps = eps
        self.dtype = dtype
        self.num_latents, self.hidden = latents.shape
        self.inner = wq.shape[0]
        self.head_dim = self.inner // num_heads
        self.scale = self.head_dim ** -0.5
        self.norm = (norm_w, norm_b)
        self.ff_norm = (ff_norm_w, ff_norm_b)
        self.w1, self.b1 = w1.to(dtype), b1.to(dtype)
        self.w2, self.b2 = w2.to(dtype), b2.to(dtype)
        self.wq, self.wkv, self.wo = wq.to(dtype), wkv.to(dtype), wo.to(dtype)
        self.latents = latents
        self.context_norm = (ctx_w, ctx_b)
        heads, r, dh, d = num_heads, self.num_latents, self.head_dim, self.hidden
        self.wq_heads = self.wq.view(heads, dh, d)                              # (H, dh, d)
        self.wo_heads = self.wo.view(d, heads, dh).transpose(0, 1)             # (H, d, dh)
        if derived is not None:  # backward: the forward pass's products, from save_for_backward
            (self.context, self.ctx_mean, self.ctx_rstd, self.keys, self.values,
             self.score_map, self.value_map) = derived
            return
        self.context, self.ctx_mean, self.ctx_rstd = _layer_norm(latents, ctx_w, ctx_b, eps)
        kv = self.context.to(dtype) @ self.wkv.T                    # (r, 2*H*dh), keys first
        self.keys = kv[:, :self.inner].reshape(r, heads, dh).transpose(0, 1)    # (H, r, dh)
        self.values = kv[:, self.inner:].reshape(r, heads, dh).transpose(0, 1)  # (H, r, dh)
        # M[:, h*r:(h+1)*r] = scale * Wq_h^T K_h^T; N[h*r:(h+1)*r] = V_h Wout_h^T.
        score_map = torch.bmm(self.wq_heads.transpose(1, 2), self.keys.transpose(1, 2)) * self.scale  # (H, d, r)
        self.score_map = score_map.transpose(0, 1).reshape(d, heads * r).contiguous()
        self.value_map = torch.bmm(self.values, self.wo_heads.transpose(1, 2)).reshape(heads * r, d).contiguous()

    def derived(self):
        """The per-call tensors the backward pass reuses (saved with save_for_backward)."""
        return (self.context, self.ctx_mean, self.ctx_rstd, self.keys, self.values, self.score_map, self.value_map)


def _pooling_matrix(sequence: torch.Tensor, token_weight: torch.Tensor, batch: int) -> torch.Tensor:
    """(B, n) matrix with token t's pooling weight in row sequence[t]: pooled = matrix @ per-token."""
    count = sequence.numel()
    matrix = torch.zeros(batch, count, dtype=token_weight.dtype, device=token_weight.device)
    matrix[sequence, torch.arange(count, device=sequence.device)] = token_weight
    return matrix


def _masked_mean_add(pooled: torch.Tensor, values: torch.Tensor, sequence: torch.Tensor,
                     token_weight: torch.Tensor, batch: int, host_check: Optional[bool] = None) -> None:
    """pooled[b] += sum of token_weight * values over the tokens of sequence b.

    A (B, n) x (n, .) product (index_add_ is serial and slow on CPU) spreads an Inf / NaN token
    to every sequence (0 * Inf = NaN), so non-finite tokens go through index_add_, which keeps
    them in their own sequence as the reference's per-sequence mean does. On CPU
    (``host_check``) the test is a cheap host branch; elsewhere it is done without a host sync:
    the finite rows through the product, the others through index_add_.
    """
    weighted_pooling = _pooling_matrix(sequence, token_weight, batch)
    if values.device.type == "cpu" if host_check is None else host_check:
        if bool(torch.isfinite(values).all()):
            pooled.addmm_(weighted_pooling, values)
        else:
            pooled.index_add_(0, sequence, values * token_weight[:, None].to(values.dtype))
        return
    finite = torch.isfinite(values).all(dim=1, keepdim=True)
    pooled.addmm_(weighted_pooling, torch.where(finite, values, torch.zeros_like(values)))
    non_finite = torch.where(finite, torch.zeros_like(values), values * token_weight[:, None].to(values.dtype))
    pooled.index_add_(0, sequence, non_finite)


def _tokens(pool_mask: torch.Tensor, dtype: torch.dtype):
    """(flat indices of the pooled tokens, their sequence index, their pooling weight m_t / sum m)."""
    batch, length = pool_mask.shape
    weights = pool_mask.double()
    flat = weights.reshape(-1)
    index = torch.nonzero(flat, as_tuple=True)[0]
    totals = weights.sum(dim=1)
    sequence = torch.div(index, length, rounding_mode="floor")
    token_weight = flat.index_select(0, index) / totals.index_select(0, sequence)
    return index, sequence, token_weight.to(dtype)


def chunked_forward(hidden_states, pool_mask, num_heads: int, eps: float, kernels: "ElementwiseKernels", params):
    """Masked-mean latent-attention pooling (before the optional L2 norm), chunk by chunk.

    Returns (pooled (B, d) in the input dtype, the tensors :func:`chunked_backward` needs, the
    chunk size in tokens). Nothing of size tokens x H*r or tokens x 2F outlives its chunk.
    """
    dtype = compute_dtype(hidden_states)
    stats = torch.float64 if dtype == torch.float64 else torch.float32
    batch, length, hidden = hidden_states.shape
    weights = _Weights([p.detach() for p in params], num_heads, eps, dtype)
    index, sequence, token_weight = _tokens(pool_mask, stats)
    flat_hidden = hidden_states.detach().reshape(batch * length, hidden)
    heads, r = num_heads, weights.num_latents
    element = torch.finfo(dtype).bits // 8
    # the (n, H*r) scores are float32 whatever the operands (see _wide_product)
    chunk = min(chunk_tokens_for(heads * r, max(element, 4)), chunk_tokens_for(2 * weights.w1.shape[0], element))
    count = index.numel()
    lse = torch.empty(count, heads, dtype=stats, device=hidden_states.device)
    residual = torch.empty(count, hidden, dtype=stats, device=hidden_states.device)
    # The masked mean is linear, so the second feed-forward layer is applied to the pooled
    # GEGLU output (B, F) once instead of to every token: mean(y + g W2^T + b2) = mean(y) +
    # mean(g) W2^T + b2 (the pooling weights of a sequence sum to 1).
    pooled_residual = torch.zeros(batch, hidden, dtype=stats, device=hidden_states.device)
    pooled_gated = torch.zeros(batch, weights.w2.shape[1], dtype=stats, device=hidden_states.device)
    for start in range(0, count, chunk):
        stop = min(count, start + chunk)
        rows = index[start:stop]
        h = _wide(flat_hidden.index_select(0, rows))
        x, _, _ = _layer_norm(h, *weights.norm, eps)
        scores = _wide_product(x.to(dtype), weights.score_map)             # (n, H*r) float32
        lse[start:stop] = kernels.softmax_forward(scores.view(-1, r)).view(-1, heads)
        y = h + _wide(scores.to(dtype) @ weights.value_map)                # attention residual
        del scores  # chunk buffers are dropped as soon as possible: the peak is one of them, not all
        residual[start:stop] = y
        z, _, _ = _layer_norm(y, *weights.ff_norm, eps)
        u = torch.addmm(weights.b1, z.to(dtype), weights.w1.T)
        gated = kernels.geglu_forward(u)
        del u
        chunk_sequence, chunk_weight = sequence[start:stop], token_weight[start:stop]
        _masked_mean_add(pooled_residual, y, chunk_sequence, chunk_weight, batch)
        # float32 weights: 1/count is rarely exact in 16 bits
        _masked_mean_add(pooled_gated, _wide(gated), chunk_sequence, chunk_weight, batch)
        del gated
    pooled = pooled_residual + _wide(torch.addmm(weights.b2, pooled_gated.to(dtype), weights.w2.T))
    saved = (index, sequence, token_weight, lse, residual, pooled_gated, *weights.derived())
    return pooled.to(hidden_states.dtype), saved, chunk


def chunked_backward(grad_pooled, hidden_states, params, saved, num_heads: int, eps: float,
                     kernels: "ElementwiseKernels", chunk: int, needs):
    """Gradients of :func:`chunked_forward`: (dL/dhidden_states or None, [dL/dparam or None]),
    ``needs`` saying which of (hidden_states, *params) want one. Recomputes each chunk's scores,
    probabilities and feed-forward pre-activation from the saved log-sum-exp and residual."""
    index, sequence, token_weight, lse, residual, pooled_gated, *derived = saved
    weights = _Weights([p.detach() for p in params], num_heads, eps, compute_dtype(hidden_states), derived=derived)
    batch, length, hidden = hidden_states.shape
    dtype, eps = weights.dtype, weights.eps
    heads, r, d = weights.num_heads, weights.num_latents, hidden
    device = hidden_states.device
    flat_hidden = hidden_states.detach().reshape(batch * length, hidden)
    grad_pooled = _wide(grad_pooled)

    def zeros(*shape):
        return torch.zeros(*shape, dtype=grad_pooled.dtype, device=device)

    grad_score_map = zeros(d, heads * r)
    grad_value_map = zeros(heads * r, d)
    grad_w1, grad_b1 = zeros(*weights.w1.shape), zeros(weights.w1.shape[0])
    # Second feed-forward layer, applied to the pooled GEGLU output in forward.
    grad_w2 = grad_pooled.to(dtype).T @ pooled_gated.to(dtype)  # a sum over B only: compute dtype is enough
    grad_b2 = grad_pooled.sum(0)
    grad_pooled_w2 = grad_pooled.to(dtype) @ weights.w2                      # (B, F)
    grad_norm_w, grad_norm_b = zeros(d), zeros(d)
    grad_ff_norm_w, grad_ff_norm_b = zeros(d), zeros(d)
    grad_hidden = torch.zeros(batch * length, hidden, dtype=hidden_states.dtype, device=device)
    count = index.numel()
    for start in range(0, count, chunk):
        stop = min(count, start + chunk)
        rows = index[start:stop]
        # Feed-forward first (its (n, 2F) buffers are freed before the (n, H*r) ones exist):
        # out = y + GEGLU(u) W2^T + b2, every token weighted by m_t / sum m.
        y = residual[start:stop]
        z, z_mean, z_rstd = _layer_norm(y, *weights.ff_norm, eps)
        z = z.to(dtype)
        u = torch.addmm(weights.b1, z, weights.w1.T)
        token_scale = token_weight[start:stop, None]
        grad_out = grad_pooled.index_select(0, sequence[start:stop]) * token_scale
        grad_gated = grad_pooled_w2.index_select(0, sequence[start:stop]) * token_scale.to(dtype)
        grad_u = kernels.geglu_backward(u, grad_gated)
        del u, grad_gated
        _accumulate_product(grad_w1, grad_u.T, z)
        grad_b1 += _wide(grad_u).sum(0)
        grad_y = grad_out + _layer_norm_backward(grad_u @ weights.w1, y, z_mean, z_rstd, *weights.ff_norm,
                                                 grad_ff_norm_w, grad_ff_norm_b)
        del grad_u, z
        # Attention: y = h + P N with P = softmax(x M) per head, recomputed from the saved lse.
        h = _wide(flat_hidden.index_select(0, rows))
        x, x_mean, x_rstd = _layer_norm(h, *weights.norm, eps)
        x = x.to(dtype)
        probs = _wide_product(x, weights.score_map)  # float32 S, then P
        kernels.softmax_recompute(probs.view(-1, r), lse[start:stop].reshape(-1))
        grad_y_c = grad_y.to(dtype)
        _accumulate_product(grad_value_map, probs.to(dtype).T, grad_y_c)
        grad_scores = _wide_product(grad_y_c, weights.value_map.T)  # float32 dP, then dS
        kernels.softmax_backward(probs.view(-1, r), grad_scores.view(-1, r))
        del probs
        grad_scores = grad_scores.to(dtype)
        _accumulate_product(grad_score_map, x.T, grad_scores)
        grad_x = grad_scores @ weights.score_map.T
        del grad_scores
        grad_h = grad_y + _layer_norm_backward(grad_x, h, x_mean, x_rstd, *weights.norm,
                                               grad_norm_w, grad_norm_b)
        grad_hidden.index_copy_(0, rows, grad_h.to(grad_hidden.dtype))

    grads = _parameter_gradients(weights, grad_score_map, grad_value_map)
    (grad_latents, grad_ctx_w, grad_ctx_b, grad_wq, grad_wkv, grad_wo) = grads
    param_grads = [grad_latents, grad_norm_w, grad_norm_b, grad_ctx_w, grad_ctx_b, grad_wq, grad_wkv, grad_wo,
                   grad_ff_norm_w, grad_ff_norm_b, grad_w1, grad_b1, grad_w2, grad_b2]
    param_grads = [g.to(p.dtype) if needs[1 + i] else None for i, (g, p) in enumerate(zip(param_grads, params))]
    grad_hidden = grad_hidden.view(batch, length, hidden) if needs[0] else None
    return grad_hidden, param_grads




def _parameter_gradients(weights: _Weights, grad_score_map: torch.Tensor, grad_value_map: torch.Tensor):
    """From dL/dM and dL/dN back to the latents, the context norm, Wq, Wkv and Wout."""
    heads, r, dh, d = weights.num_heads, weights.num_latents, weights.head_dim, weights.hidden
    dtype = weights.dtype
    grad_m = grad_score_map.to(dtype).view(d, heads, r).transpose(0, 1)   # (H, d, r)
    grad_n = grad_value_map.to(dtype).view(heads, r, d)                    # (H, r, d)
    # M_h = s Wq_h^T K_h^T  =>  dWq_h = s K_h^T dM_h^T, dK_h = s dM_h^T Wq_h^T
    grad_wq = torch.bmm(weights.keys.transpose(1, 2), grad_m.transpose(1, 2)) * weights.scale   # (H, dh, d)
    grad_keys = torch.bmm(grad_m.transpose(1, 2), weights.wq_heads.transpose(1, 2)) * weights.scale  # (H, r, dh)
    # N_h = V_h Wout_h^T  =>  dV_h = dN_h Wout_h, dWout_h = dN_h^T V_h
    grad_values = torch.bmm(grad_n, weights.wo_heads)                       # (H, r, dh)
    grad_wo = torch.bmm(grad_n.transpose(1, 2), weights.values)              # (H, d, dh)
    grad_kv = torch.cat([grad_keys.transpose(0, 1).reshape(r, heads * dh),
                         grad_values.transpose(0, 1).reshape(r, heads * dh)], dim=1)  # (r, 2*H*dh)
    grad_wkv = grad_kv.T @ weights.context.to(dtype)
    grad_context = _wide(grad_kv @ weights.wkv)
    grad_ctx_w = torch.zeros(d, dtype=grad_context.dtype, device=grad_context.device)
    grad_ctx_b = torch.zeros_like(grad_ctx_w)
    grad_latents = _layer_norm_backward(grad_context, weights.latents, weights.ctx_mean, weights.ctx_rstd,
                                        *weights.context_norm, grad_ctx_w, grad_ctx_b)
    return (grad_latents, grad_ctx_w, grad_ctx_b, grad_wq.reshape(heads * dh, d), grad_wkv,
            grad_wo.transpose(0, 1).reshape(d, heads * dh))
