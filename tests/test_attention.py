"""cocoa_kernels.attention against a float64 dense truth: outputs and dq/dk/dv.

Both implementations are checked: "triton" (compiled on a GPU, interpreted on the CPU) and "torch".
"""

from __future__ import annotations

import pytest
import torch

from attention_cases import FAMILIES, assert_close, make_mask, make_qkv, run_with_grads, truth_and_baseline
from conftest import DEVICE, SMALL_TILES
from cocoa_kernels import KeyRanges, attention
from cocoa_kernels.attention import config as attn_config
from cocoa_kernels.attention import reference

IMPLS = ("triton", "torch")
NAMES = ("out", "dq", "dk", "dv")


def check_against_truth(impl, q, k, v, do, mask, scale=None, mult=2.0):
    got = run_with_grads(lambda a, b, c: attention(a, b, c, mask, scale=scale, impl=impl), q, k, v, do)
    truth, base = truth_and_baseline(q, k, v, do, mask, scale)
    for name, g, t, b in zip(NAMES, got, truth, base):
        assert_close(f"{impl} {name}", g, t, b, mult=mult)
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("impl", IMPLS)
def test_mask_families_gqa(impl, family, dtype):
    B, Hq, Hkv, N, D = 2, 4, 2, 130, 64
    mask = make_mask(family, B, N, seed=1).to(DEVICE)
    q, k, v, do = make_qkv(B, Hq, Hkv, N, D, dtype, DEVICE, seed=2)
    check_against_truth(impl, q, k, v, do, mask)


@pytest.mark.parametrize("splits", [2, 3, 6, 4], ids=lambda s: f"splits{s}")
def test_dkdv_group_split(splits):
    """dK/dV with a K/V head's six query heads split over several programs (fp32 partials summed
    by the launcher), as short rows get on a GPU; 4 is not a divisor of 6 and rounds down to 3."""
    cfg = attn_config.AttentionConfig(SMALL_TILES.fwd, SMALL_TILES.dq, SMALL_TILES.dkdv, dkdv_splits=splits)
    assert attn_config.dkdv_splits(cfg, 6, 1, torch.device("cuda")) == {4: 3}.get(splits, splits)
    mask = make_mask("eos_bridge", 2, 75, seed=23).to(DEVICE)
    q, k, v, do = make_qkv(2, 6, 1, 75, 64, torch.bfloat16, DEVICE, seed=23)
    with attn_config.use_config(cfg):
        check_against_truth("triton", q, k, v, do, mask)


def test_dkdv_split_fills_the_gpu(monkeypatch):
    """Unpinned, the split is the smallest divisor of the group that gives every SM
    ``DKDV_MIN_WAVES`` (3) programs, so that heaviest-first can even out uneven key tiles."""
    monkeypatch.setattr(attn_config, "_sm_count", lambda index: 132)
    cfg, gpu = SMALL_TILES, torch.device("cuda", 0)
    assert attn_config.dkdv_splits(cfg, 6, 16, gpu) == 6  # 1k tokens, B 1, 2 K/V heads: 96 < 396
    assert attn_config.dkdv_splits(cfg, 6, 64, gpu) == 6  # 384 < 396: the whole group
    assert attn_config.dkdv_splits(cfg, 6, 132, gpu) == 3  # 396 >= 396
    assert attn_config.dkdv_splits(cfg, 6, 256, gpu) == 2  # 16k tokens: 512
    assert attn_config.dkdv_splits(cfg, 6, 512, gpu) == 1  # 32k tokens: enough already
    assert attn_config.dkdv_splits(cfg, 1, 4, gpu) == 1  # no group, nothing to split
    assert attn_config.dkdv_splits(cfg, 6, 4, torch.device("cpu")) == 1


@pytest.mark.parametrize("D", [64, 80, 96, 128, 59], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("impl", IMPLS)
def test_head_dims(impl, D):
    B, Hq, Hkv, N = 1, 2, 1, 45
    dtype = torch.bfloat16 if D == 80 else torch.float32  # 80: the vision tower's, in bf16
    mask = make_mask("eos_bridge", B, N, seed=D).to(DEVICE)
    q, k, v, do = make_qkv(B, Hq, Hkv, N, D, dtype, DEVICE, seed=D)
    check_against_truth(impl, q, k, v, do, mask)


@pytest.mark.parametrize("N", [1, 17], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("family", ["causal_packed", "eos_bridge"])
@pytest.mark.parametrize("impl", IMPLS)
def test_odd_lengths(impl, family, N):
    mask = make_mask(family, 2, N, seed=N).to(DEVICE)
    q, k, v, do = make_qkv(2, 2, 2, N, 64, torch.float32, DEVICE, seed=N)
    check_against_truth(impl, q, k, v, do, mask)


@pytest.mark.parametrize("impl", IMPLS)
def test_fp16_and_custom_scale(impl):
    mask = make_mask("bidir_packed", 2, 50, seed=3).to(DEVICE)
    q, k, v, do = make_qkv(2, 3, 1, 50, 64, torch.float16, DEVICE, seed=3)
    check_against_truth(impl, q, k, v, do, mask, scale=0.3)


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_inputs_as_transformers_passes_them(impl):
    """q from a (B, N, H, D) projection viewed as (B, H, N, D); k and v slices of one fused tensor."""
    B, Hq, Hkv, N, D = 2, 4, 2, 37, 64
    gen = torch.Generator().manual_seed(5)
    q_tok = torch.randn(B, N, Hq, D, generator=gen).to(DEVICE)
    kv_tok = torch.randn(B, N, 2 * Hkv, D, generator=gen).to(DEVICE)
    q = q_tok.transpose(1, 2)
    k = kv_tok[:, :, :Hkv].transpose(1, 2)
    v = kv_tok[:, :, Hkv:].transpose(1, 2)
    assert not q.is_contiguous() and not k.is_contiguous()
    do = torch.randn(B, Hq, N, D, generator=gen).to(DEVICE)
    mask = make_mask("causal_packed", B, N, seed=5).to(DEVICE)
    got = check_against_truth(impl, q, k, v, do, mask)
    # The output is token-major in memory, so transformers' transpose(1, 2) back is free.
    assert got[0].transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("impl", IMPLS)
def test_rows_that_see_nothing_give_zeros_and_zero_grads(impl):
    B, H, N, D = 1, 2, 40, 64
    lo = torch.zeros(B, N, dtype=torch.int32)
    hi = torch.full((B, N), N, dtype=torch.int32)
    hi[0, 10:25] = 0  # these queries see nothing
    mask = KeyRanges(lo, hi).to(DEVICE)
    q, k, v, do = make_qkv(B, H, H, N, D, torch.float32, DEVICE, seed=7)
    out, dq, dk, dv = check_against_truth(impl, q, k, v, do, mask)
    assert torch.all(out[:, :, 10:25] == 0)
    assert torch.all(dq[:, :, 10:25] == 0)
    # Huge scores (softmax ~one-hot) must not turn the empty rows, or any other, into NaN/inf.
    out, dq, dk, dv = run_with_grads(lambda a, b, c: attention(a, b, c, mask, impl=impl), q * 1e3, k, v, do)
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all()
    assert torch.all(out[:, :, 10:25] == 0) and torch.all(dq[:, :, 10:25] == 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_all_padding_batch(impl):
    mask = KeyRanges.from_segments(torch.full((2, 19), -1)).to(DEVICE)
    q, k, v, do = make_qkv(2, 2, 1, 19, 64, torch.bfloat16, DEVICE)
    out, dq, dk, dv = run_with_grads(lambda a, b, c: attention(a, b, c, mask, impl=impl), q, k, v, do)
    for t in (out, dq, dk, dv):
        assert torch.all(t == 0)


@pytest.mark.parametrize("impl", IMPLS + ("reference",))
def test_eos_bridge_whose_bridge_row_sees_the_whole_sample(impl, monkeypatch):
    """``eos_sees="all"`` (the authors' mask: the EOS row also sees block B) in every
    implementation, against the float64 truth of its dense form; the bridge rows' outputs differ
    from the default mask's, so the option reaches the kernels."""
    from attention_cases import bridge_targets, packed_segments
    from cocoa_kernels.attention import op

    if impl == "reference":
        monkeypatch.setattr(op, "_torch_impl", lambda q: reference)
    gen = torch.Generator().manual_seed(29)
    seg = torch.stack([packed_segments(75, gen, pad=p, max_len=60) for p in (0, 9)])
    target = torch.stack([bridge_targets(seg[b], gen) for b in range(2)])
    mask = KeyRanges.eos_bridge(seg, target, eos_sees="all").to(DEVICE)
    default = KeyRanges.eos_bridge(seg, target).to(DEVICE)
    q, k, v, do = make_qkv(2, 4, 2, 75, 64, torch.float32, DEVICE, seed=29)
    run = "torch" if impl == "reference" else impl
    got = check_against_truth(run, q, k, v, do, mask)
    bridge_rows = (mask.hi != default.hi).any(0)
    assert bridge_rows.any()
    base = attention(q, k, v, default, impl=run)
    assert not torch.allclose(got[0][:, :, bridge_rows], base[:, :, bridge_rows])


def test_backward_is_deterministic():
    mask = make_mask("eos_bridge", 2, 70, seed=11).to(DEVICE)
    q, k, v, do = make_qkv(2, 4, 1, 70, 64, torch.bfloat16, DEVICE, seed=11)
    first = run_with_grads(lambda a, b, c: attention(a, b, c, mask, impl="triton"), q, k, v, do)
    second = run_with_grads(lambda a, b, c: attention(a, b, c, mask, impl="triton"), q, k, v, do)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


def test_reference_in_chunks_matches_one_chunk(monkeypatch):
    """reference.py's query chunking and key-hull slicing do not change the result (pinned: CPU
    tensors otherwise go to cpu.py; its plans are tested in test_attention_cpu.py)."""
    from cocoa_kernels.attention import op

    monkeypatch.setattr(op, "_torch_impl", lambda q: reference)
    mask = make_mask("eos_bridge", 2, 90, seed=13)
    q, k, v, do = make_qkv(2, 2, 1, 90, 64, torch.float64, "cpu", seed=13)
    whole = run_with_grads(lambda a, b, c: attention(a, b, c, mask, impl="torch"), q, k, v, do)
    monkeypatch.setattr(reference, "_CHUNK_ELEMENTS", 2 * 2 * 90 * 7)  # 7 rows a chunk
    chunked = run_with_grads(lambda a, b, c: attention(a, b, c, mask, impl="torch"), q, k, v, do)
    for name, a, b in zip(NAMES, whole, chunked):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


def test_default_impl_follows_device():
    mask = make_mask("bidir_packed", 1, 20).to(DEVICE)
    q, k, v, _ = make_qkv(1, 2, 2, 20, 64, torch.float32, DEVICE)
    expected = attention(q, k, v, mask, impl="triton" if DEVICE.type == "cuda" else "torch")
    torch.testing.assert_close(attention(q, k, v, mask), expected, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE.type != "cuda", reason="a 128k-token row needs a GPU")
def test_128k_token_row_matches_torch_path():
    """Long rows: thousands of tiles per row with the shipped tile configs."""
    N, D = 131072, 128
    seg = torch.arange(4).repeat_interleave(N // 4)[None]
    is_target = (torch.arange(N) % (N // 4) >= N // 4 - 4096)[None]
    mask = KeyRanges.eos_bridge(seg, is_target).to(DEVICE)
    q, k, v, do = make_qkv(1, 2, 1, N, D, torch.bfloat16, DEVICE, seed=17)
    got = run_with_grads(lambda a, b, c: attention(a, b, c, mask, impl="triton"), q, k, v, do)
    ref = run_with_grads(lambda a, b, c: attention(a, b, c, mask, impl="torch"), q, k, v, do)
    for name, a, b in zip(NAMES, got, ref):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a.float(), b.float(), atol=3e-2, rtol=3e-2, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a GPU with > 13 GB free")
def test_offsets_past_int32():
    """Batch 1 of q, k and v starts past element 2**31 of its buffer: every base offset must be
    int64 (an int32 product would wrap and read batch 0 or garbage)."""
    B, H, N, D = 2, 2, 300, 128
    batch_stride = 2**31 + 4096
    mask = make_mask("eos_bridge", B, N, seed=19).to(DEVICE)
    views = []
    for seed in range(3):
        buf = torch.empty(batch_stride + H * N * D, dtype=torch.bfloat16, device=DEVICE)
        view = buf.as_strided((B, H, N, D), (batch_stride, N * D, D, 1))
        view.copy_(torch.randn(B, H, N, D, generator=torch.Generator().manual_seed(seed)).to(DEVICE))
        views.append(view)
    do = torch.randn(B, H, N, D, device=DEVICE, dtype=torch.bfloat16)
    q, k, v = (t.requires_grad_() for t in views)  # views stay views: no clone, no copy
    out = attention(q, k, v, mask, impl="triton")
    got = (out, *torch.autograd.grad(out, (q, k, v), do))
    ref = run_with_grads(
        lambda a, b, c: attention(a, b, c, mask, impl="triton"), *(t.detach().contiguous() for t in views), do
    )
    for name, a, b in zip(NAMES, got, ref):
        assert torch.equal(a, b), name
