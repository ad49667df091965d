"""Both public ops under ``torch.autocast``: they follow it as F.scaled_dot_product_attention and
F.linear do (inputs cast to the region's dtype, gradients back in each input's own dtype), their
arithmetic stays fp32-accumulated inside the region, and outside it mixed dtypes are a clear
TypeError. CPU autocast here (CUDA autocast on a GPU), both impls (Triton interpreted on a CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attention_cases
import loss_cases
from conftest import DEVICE
from cocoa_kernels import attention, linear_cross_entropy

IMPLS = ("triton", "torch")
BF16 = torch.bfloat16
LOSS_NAMES = ("loss", "d_hidden", "d_weight", "d_bias")


def _region(dtype=BF16):
    return torch.autocast(DEVICE.type, dtype=dtype)


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _grads(out, inputs, grad_out):
    return list(torch.autograd.grad(out, inputs, grad_out))


# ------------------------------------------------------------------------------ attention


def _attention_inputs(seed=0):
    q, k, v, do = attention_cases.make_qkv(1, 2, 1, 33, 64, torch.float32, DEVICE, seed=seed)
    mask = attention_cases.make_mask("eos_bridge", 1, 33, seed=seed).to(DEVICE)
    return q, k, v, do, mask


@pytest.mark.parametrize("v_dtype", [BF16, torch.float32], ids=["fp32_qk_bf16_v", "all_fp32"])
@pytest.mark.parametrize("impl", IMPLS)
def test_attention_follows_autocast(impl, v_dtype):
    """fp32 q/k beside a bf16 v (what a transformers layer hands over after an fp32 rotary), and
    all-fp32 inputs: a bf16 output equal to the op on bf16 copies, as accurate as PyTorch's bf16
    attention, and gradients in each input's own dtype, with the backward also run in the region."""
    q, k, v, do, mask = _attention_inputs()
    q, k, v = _leaves(q, k, v.to(v_dtype))
    with _region():
        out = attention(q, k, v, mask, impl=impl)
        assert out.dtype == F.scaled_dot_product_attention(q, k[:, [0, 0]], v[:, [0, 0]]).dtype == BF16
        dq, dk, dv = _grads(out, (q, k, v), do.to(BF16))
    assert (dq.dtype, dk.dtype, dv.dtype) == (torch.float32, torch.float32, v_dtype)

    # Autocast means exactly "the op on bf16 copies": same bits, forward and backward.
    q16, k16, v16 = _leaves(q.to(BF16), k.to(BF16), v.to(BF16))
    out16 = attention(q16, k16, v16, mask, impl=impl)
    ref = [out16.detach(), *_grads(out16, (q16, k16, v16), do.to(BF16))]
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), ref):
        assert torch.equal(got.detach(), want.to(got.dtype)), name

    # And that is bf16-grade accurate against the float64 truth on the bf16-rounded inputs.
    rounded = [t.detach().to(BF16) for t in (q, k, v)]
    truth, base = attention_cases.truth_and_baseline(*rounded, do.to(BF16), mask)
    for name, got, t, b in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), truth, base):
        attention_cases.assert_close(f"{impl} {name}", got.to(BF16), t, b)


def test_attention_follows_the_region_dtype_and_leaves_float64_alone():
    """An fp16 region gives fp16 (the reason the cast reads the region's dtype rather than a
    dtype fixed at registration); float64 inputs are not cast, as autocast leaves them."""
    q, k, v, _, mask = _attention_inputs(seed=1)
    with _region(torch.float16):
        assert attention(q, k, v.half(), mask, impl="torch").dtype == torch.float16
    with _region():
        assert attention(q.double(), k.double(), v.double(), mask, impl="torch").dtype == torch.float64


def test_attention_mixed_dtypes_outside_autocast_is_a_type_error():
    q, k, v, _, mask = _attention_inputs()
    with pytest.raises(TypeError, match=r"v must have q's dtype torch.float32, got torch.bfloat16.*torch.autocast"):
        attention(q, k, v.to(BF16), mask)
    with _region(), torch.autocast(DEVICE.type, enabled=False):  # a region switched off is outside
        with pytest.raises(TypeError, match="k must have q's dtype"):
            attention(q, k.to(BF16), v, mask)


def test_attention_compiles_fullgraph_under_autocast():
    """torch.compile traces the cast and the custom op in one graph under autocast; forward and
    gradients match eager."""
    q, k, v, do, mask = _attention_inputs(seed=2)
    v = v.to(BF16)

    def layer(q, k, v):
        return attention(q * 2, k, v, mask, impl="torch")

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")  # ~3 s on a CPU
    results = []
    for fn in (layer, compiled):
        a, b, c = _leaves(q, k, v)
        with _region():
            out = fn(a, b, c)
            results.append([out.detach(), *_grads(out, (a, b, c), do.to(BF16))])
    for name, eager, traced in zip(("out", "dq", "dk", "dv"), *results):
        assert traced.dtype == eager.dtype, name
        torch.testing.assert_close(traced, eager, rtol=0, atol=0, msg=name)


# ------------------------------------------------------------------------------ loss


@pytest.mark.parametrize("hidden_dtype", [BF16, torch.float32], ids=["bf16_hidden", "fp32_hidden"])
@pytest.mark.parametrize("impl", IMPLS)
def test_loss_follows_autocast(impl, hidden_dtype):
    """An fp32 master weight and bias beside bf16 (or fp32) hidden states, shift=1 as in stage 1:
    an fp32 loss equal to the op on bf16 copies, as accurate as PyTorch's bf16 loss, fp32
    gradients for the master weight and bias, hidden's gradient in hidden's dtype, with the
    backward also run in the region (its GEMMs must not be recast)."""
    hidden, weight, bias, labels, _ = loss_cases.make_inputs((2, 19), 64, 97, torch.float32, DEVICE, seed=3)
    hidden, weight, bias = _leaves(hidden.to(hidden_dtype), weight, bias)
    with _region():
        loss = linear_cross_entropy(hidden, weight, labels, bias=bias, shift=1, impl=impl)
        assert loss.dtype == torch.float32
        grads = _grads(loss, (hidden, weight, bias), torch.tensor(0.7, device=DEVICE))
    assert [g.dtype for g in grads] == [hidden_dtype, torch.float32, torch.float32]

    h16, w16, b16 = _leaves(hidden.to(BF16), weight.to(BF16), bias.to(BF16))
    loss16 = linear_cross_entropy(h16, w16, labels, bias=b16, shift=1, impl=impl)
    ref = [loss16.detach(), *_grads(loss16, (h16, w16, b16), torch.tensor(0.7, device=DEVICE))]
    for name, got, want in zip(LOSS_NAMES, (loss, *grads), ref):
        assert torch.equal(got.detach(), want.to(got.dtype)), name

    rounded = [t.detach().to(BF16) for t in (hidden, weight, bias)]
    up = torch.ones(labels.shape, device=DEVICE)
    truth, base = loss_cases.truth_and_baseline(rounded[0], rounded[1], labels, rounded[2], up, 1, "mean")
    for name, got, t, b in zip(LOSS_NAMES, (loss, *grads), truth, base):
        loss_cases.assert_close(f"{impl} {name}", got, t, b, BF16)


def test_loss_mixed_dtypes_outside_autocast_is_a_type_error():
    hidden, weight, bias, labels, _ = loss_cases.make_inputs((2, 7), 16, 11, torch.float32, DEVICE, seed=4)
    with pytest.raises(TypeError, match=r"weight must have hidden's dtype torch.bfloat16, got torch.float32.*autocast"):
        linear_cross_entropy(hidden.to(BF16), weight, labels)
    with pytest.raises(TypeError, match=r"bias must have hidden's dtype torch.float32, got torch.bfloat16"):
        linear_cross_entropy(hidden, weight, labels, bias=bias.to(BF16))

