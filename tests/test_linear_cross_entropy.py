"""cocoa_kernels.linear_cross_entropy against a float64 F.cross_entropy truth: loss and the
gradients of hidden, weight and bias, for impl="triton" (compiled on a GPU, interpreted on the
CPU) and impl="torch"; plus validation, custom-op checks, torch.compile, determinism, memory."""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, ON_GPU
from cocoa_kernels import linear_cross_entropy
from cocoa_kernels.losses import config, op, reference, workspace
from loss_cases import EPS, IGNORE, assert_close, make_inputs, run_with_grads, torch_loss, truth_and_baseline

IMPLS = ("triton", "torch")
NAMES = ("loss", "d_hidden", "d_weight", "d_bias")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_against_truth(impl, hidden, weight, labels, bias, upstream, shift=0, reduction="mean", mult=2.0):
    def fn(h, w, b):
        return linear_cross_entropy(h, w, labels, bias=b, shift=shift, reduction=reduction, impl=impl)

    got = run_with_grads(fn, hidden, weight, bias, upstream)
    truth, base = truth_and_baseline(hidden, weight, labels, bias, upstream, shift, reduction)
    assert got[0].dtype == torch.float32
    assert got[0].shape == truth[0].shape
    for name, g, t, b in zip(NAMES, got, truth, base):
        if t is None:
            assert g is None
            continue
        assert g.shape == t.shape, name
        assert_close(f"{impl} {name}", g, t, b, hidden.dtype, mult=mult)
    # The loss is accumulated and returned in fp32 whatever the inputs' dtype: it must also be as
    # close as PyTorch's fp32 computation on the same (upcast) inputs.
    base32 = torch_loss(hidden.float(), weight.float(), labels, None if bias is None else bias.float(),
                        shift=shift, reduction=reduction)
    assert_close(f"{impl} loss vs fp32", got[0], truth[0], base32, torch.float32, mult=mult)
    return got


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("impl", IMPLS)
def test_shift1_bias_odd_sizes(impl, dtype, reduction):
    """(B, N, H) with shift=1 (the last position of each row scores nothing), bias, V = 1007 and
    H = 80 (partial vocab tiles and hidden chunks), about half the labels ignored."""
    hidden, weight, bias, labels, up = make_inputs((2, 37), 80, 1007, DTYPES[dtype], DEVICE, seed=1)
    _, d_hidden, *_ = check_against_truth(impl, hidden, weight, labels, bias, up, shift=1, reduction=reduction)
    assert torch.all(d_hidden[:, -1] == 0)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("impl", IMPLS)
def test_flat_rows_every_label_counts(impl, dtype):
    """(T, H) hidden, no bias, no ignored label (count == T: full row tiles), even H."""
    hidden, weight, _, labels, up = make_inputs((61,), 64, 300, DTYPES[dtype], DEVICE, seed=2, ignore_frac=0.0,
                                                bias=False)
    check_against_truth(impl, hidden, weight, labels, None, up, reduction="sum")


def test_many_row_tiles_grouped_launch_order():
    """170 counted rows: 11 row tiles of the interpreter's 16, i.e. two launch groups of 8 row
    tiles, the second one partial; V = 600 in the interpreter's one-tile chunks (its budget is
    below the fp32 d_hidden rows here), the last one partial."""
    hidden, weight, bias, labels, up = make_inputs((170,), 136, 600, torch.float32, DEVICE, seed=21, ignore_frac=0.0)
    check_against_truth("triton", hidden, weight, labels, bias, up, reduction="sum")


@pytest.mark.parametrize("impl", IMPLS)
def test_shift2_int32_labels_per_position(impl):
    hidden, weight, bias, labels, up = make_inputs((3, 23), 64, 513, torch.float32, DEVICE, seed=3,
                                                   label_dtype=torch.int32)
    loss, *_ = check_against_truth(impl, hidden, weight, labels, bias, up, shift=2, reduction="none")
    assert torch.all(loss[:, :2] == 0)
    assert torch.all(loss[labels == IGNORE] == 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_inputs_whole_vocab_tiles(impl):
    """hidden a transposed view, weight a column slice of a wider matrix, bias a strided slice;
    V = 384 is a whole number of vocab tiles (no masked vocab tile anywhere)."""
    hidden, weight, bias, labels, up = make_inputs((2, 29), 80, 384, torch.float32, DEVICE, seed=4)
    hidden_t = hidden.transpose(0, 1).contiguous().transpose(0, 1)
    wide = torch.zeros(384, 96, device=DEVICE)
    wide[:, 8:88] = weight
    bias2 = torch.stack([bias, bias], dim=1)[:, 0]
    assert not hidden_t.is_contiguous() and not wide[:, 8:88].is_contiguous() and not bias2.is_contiguous()
    check_against_truth(impl, hidden_t, wide[:, 8:88], labels, bias2, up, shift=1, reduction="mean")


@pytest.mark.parametrize("impl", IMPLS)
def test_rows_that_do_not_count_are_never_read(impl):
    """NaN in every hidden row that scores nothing (ignored label, or past the row end with
    shift=1) changes nothing: those rows are compacted away before any arithmetic."""
    hidden, weight, bias, labels, up = make_inputs((2, 31), 64, 300, torch.bfloat16, DEVICE, seed=17)
    scored = torch.zeros_like(labels, dtype=torch.bool)
    scored[:, :-1] = labels[:, 1:] != IGNORE
    poisoned = hidden.masked_fill(~scored[..., None], float("nan"))

    def fn(h, w, b):
        return linear_cross_entropy(h, w, labels, bias=b, shift=1, reduction="none", impl=impl)

    clean = run_with_grads(fn, hidden, weight, bias, up)
    dirty = run_with_grads(fn, poisoned, weight, bias, up)
    for name, a, b in zip(NAMES, clean, dirty):
        assert torch.equal(a, b), name
    assert torch.all(clean[1][~scored] == 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_peaked_softmax(impl):
    """Logits of std ~60: one-hot softmax rows, exp of large negatives; no inf or NaN anywhere."""
    hidden, weight, bias, labels, up = make_inputs((57,), 64, 333, torch.float32, DEVICE, seed=5)
    got = check_against_truth(impl, hidden * 30, weight, labels, bias * 30, up, reduction="sum")
    for t in got:
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("impl", IMPLS)
def test_nothing_counts(impl, reduction):
    """Every label ignored (or shifted out of its row): loss 0.0, gradients exactly 0, no NaN."""
    hidden, weight, bias, labels, up = make_inputs((2, 9), 64, 100, torch.bfloat16, DEVICE, seed=6)
    cases = [(torch.full_like(labels, IGNORE), 1), (labels.clamp(min=0), 9), (labels.clamp(min=0), 20)]
    for lab, shift in cases:
        got = run_with_grads(
            lambda h, w, b: linear_cross_entropy(h, w, lab, bias=b, shift=shift, reduction=reduction, impl=impl),
            hidden, weight, bias, up,
        )
        for name, t in zip(NAMES, got):
            assert torch.all(t == 0), f"{name} not all zero (shift={shift})"
        assert got[0].shape == (() if reduction != "none" else lab.shape)


def test_backward_is_deterministic():
    hidden, weight, bias, labels, up = make_inputs((2, 41), 80, 1007, torch.bfloat16, DEVICE, seed=7)

    def fn(h, w, b):
        return linear_cross_entropy(h, w, labels, bias=b, shift=1, reduction="none", impl="triton")

    first = run_with_grads(fn, hidden, weight, bias, up)
    second = run_with_grads(fn, hidden, weight, bias, up)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


def test_reference_in_chunks_matches_one_chunk(monkeypatch):
    """The CPU path's row chunking does not change the result (float64)."""
    hidden, weight, bias, labels, up = make_inputs((2, 30), 48, 211, torch.float64, "cpu", seed=8)

    def fn(h, w, b):
        return linear_cross_entropy(h, w, labels, bias=b, shift=1, reduction="none", impl="torch")

    whole = run_with_grads(fn, hidden, weight, bias, up)
    monkeypatch.setattr(reference, "_CHUNK_ELEMENTS", 211 * 7)  # 7 rows a chunk
    chunked = run_with_grads(fn, hidden, weight, bias, up)
    truth = run_with_grads(lambda h, w, b: torch_loss(h, w, labels, b, shift=1, reduction="none"),
                           hidden, weight, bias, up)
    for name, a, b, t in zip(NAMES, whole, chunked, truth):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
        torch.testing.assert_close(a, t, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("filtered", [False, True], ids=["exact", "filtered"])
@pytest.mark.parametrize("on_gpu", [False, True], ids=["interpreter", "gpu"])
@pytest.mark.parametrize("rows", [1, 37, 6554, 200_000])
def test_backward_vocab_chunks_fit_the_budget(on_gpu, rows, filtered):
    """The backward's vocab chunk C: whole tiles (or the whole vocab), never below its floor of
    H / 2 columns (rounded up to a tile); the widest whose workspace fits the budget, unless
    even the floor does not (very many counted rows), where C sits at the floor."""
    for dtype in (torch.bfloat16, torch.float32):
        cfg = config.pick_config(on_gpu, dtype)
        tile = cfg.dz.block_v
        for V in (300, 1007, 151_936):
            for H in (64, 80, 1536, 3584):
                T = rows * 5 // 2

                def size(c):
                    return workspace.backward_workspace_bytes(rows, T, V, H, dtype, c, filtered=filtered,
                                                              block_m=cfg.dz.block_m, block_v=tile)

                chunk = workspace.vocab_chunk(cfg, rows, T, V, H, dtype, filtered=filtered)
                floor = max(1, -(-(H // 2) // tile)) * tile
                assert 0 < chunk <= V
                assert chunk == V or chunk % tile == 0
                assert chunk >= min(V, floor)
                if chunk > floor:
                    assert size(chunk) <= cfg.workspace_bytes
                if chunk < V and size(floor) <= cfg.workspace_bytes:
                    assert size(chunk + tile) > cfg.workspace_bytes  # the widest that fits
    cfg = config.pick_config(False, torch.bfloat16)
    assert workspace.vocab_chunk(cfg, 37, 74, 1007, 80, torch.bfloat16) < 1007


def test_default_impl_follows_device():
    hidden, weight, bias, labels, _ = make_inputs((2, 20), 64, 128, torch.float32, DEVICE, seed=9)
    expected = linear_cross_entropy(hidden, weight, labels, bias=bias, impl="triton" if ON_GPU else "torch")
    torch.testing.assert_close(linear_cross_entropy(hidden, weight, labels, bias=bias), expected, rtol=0, atol=0)


# ---------------------------------------------------------------- validation


def _bad_inputs():
    h, w, b, y, _ = make_inputs((2, 5), 16, 10, torch.float32, DEVICE, seed=10)
    ok = dict(hidden=h, weight=w, labels=y, bias=b)
    H = h.shape[-1]
    return [
        ("labels above V", dict(labels=y.clamp(min=0) + 10), ValueError, r"labels must be in \[0, V=10\)"),
        ("negative label", dict(labels=torch.full_like(y, -1)), ValueError, "labels must be in"),
        ("hidden int", dict(hidden=h.long()), TypeError, "hidden must be one of"),
        ("labels float", dict(labels=y.float()), TypeError, "labels must be an integer tensor"),
        ("labels int16", dict(labels=y.to(torch.int16)), TypeError, "labels must be an integer tensor"),
        ("weight dtype", dict(weight=w.double()), TypeError, "weight must have hidden's dtype"),
        ("bias dtype", dict(bias=b.half()), TypeError, "bias must have hidden's dtype"),
        ("hidden 1-D", dict(hidden=h[0, 0]), ValueError, r"hidden must have shape \(T, H\) or \(B, N, H\)"),
        ("hidden 4-D", dict(hidden=h[None]), ValueError, r"hidden must have shape \(T, H\) or \(B, N, H\)"),
        ("mismatched H", dict(weight=w[:, :-1]), ValueError, rf"weight must have shape \(V, H={H}\)"),
        ("weight 1-D", dict(weight=w[0]), ValueError, r"weight must have shape \(V, H="),
        ("labels shape", dict(labels=y[:, :-1]), ValueError, "labels must have hidden's leading shape"),
        ("bias shape", dict(bias=b[:-1]), ValueError, r"bias must have shape \(V,\)"),
        ("hidden not tensor", dict(hidden=h.tolist()), TypeError, "hidden must be a torch.Tensor"),
        ("bias not tensor", dict(bias=1.0), TypeError, "bias must be a torch.Tensor or None"),
        ("empty vocab", dict(weight=w[:0], bias=b[:0]), ValueError, "empty vocab"),
    ], ok


@pytest.mark.parametrize("case", [c[0] for c in _bad_inputs()[0]])
def test_validation_errors(case):
    cases, ok = _bad_inputs()
    _, change, exc, match = next(c for c in cases if c[0] == case)
    args = {**ok, **change}
    with pytest.raises(exc, match=match):
        linear_cross_entropy(args["hidden"], args["weight"], args["labels"], bias=args["bias"])


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(shift=-1), ValueError, "shift must be >= 0"),
        (dict(shift=1.0), TypeError, "shift must be a non-negative int"),
        (dict(shift=True), TypeError, "shift must be a non-negative int"),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(ignore_index=-100.0), TypeError, "ignore_index must be an int"),
        (dict(impl="cuda"), ValueError, "impl must be one of"),
    ],
)
def test_argument_errors(kwargs, exc, match):
    h, w, b, y, _ = make_inputs((2, 5), 16, 10, torch.float32, DEVICE, seed=11)
    with pytest.raises(exc, match=match):
        linear_cross_entropy(h, w, y, bias=b, **kwargs)


def test_shift_needs_rows():
    h, w, b, y, _ = make_inputs((7,), 16, 10, torch.float32, DEVICE, seed=12)
    with pytest.raises(ValueError, match=r"shift=1 needs hidden of shape \(B, N, H\)"):
        linear_cross_entropy(h, w, y, shift=1)
    linear_cross_entropy(h, w, y, shift=0)  # fine


@pytest.mark.skipif(ON_GPU, reason="CPU-only rule")
def test_float64_only_with_torch_impl():
    h, w, b, y, _ = make_inputs((7,), 16, 10, torch.float64, "cpu", seed=13)
    linear_cross_entropy(h, w, y, impl="torch")
    with pytest.raises(TypeError, match="hidden must be one of"):
        linear_cross_entropy(h, w, y, impl="triton")


# ---------------------------------------------------------------- custom ops and compile


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("impl", IMPLS)
def test_opcheck(impl, with_bias):
    hidden, weight, bias, labels, up = make_inputs((40,), 32, 100, torch.float32, DEVICE, seed=14, bias=with_bias)
    hidden.requires_grad_()
    weight.requires_grad_()
    if bias is not None:
        bias.requires_grad_()
    torch.library.opcheck(op.linear_cross_entropy_fwd, (hidden, weight, bias, labels, IGNORE, impl))
    loss, lse = op.linear_cross_entropy_fwd(hidden, weight, bias, labels, IGNORE, impl)
    args = (up.float(), hidden.detach(), weight.detach(), None if bias is None else bias.detach(), labels,
            lse, IGNORE, impl)
    torch.library.opcheck(op.linear_cross_entropy_bwd, args)
    torch.library.opcheck(op.linear_cross_entropy_bwd, args + (True, False, False))


@pytest.mark.parametrize("frozen", ["weight", "hidden", "bias"])
@pytest.mark.parametrize("impl", IMPLS)
def test_only_the_gradients_autograd_asks_for(impl, frozen):
    """A frozen LM head (LoRA), a frozen backbone or a frozen bias: the other gradients are the
    same bits as when everything trains, and the backward op returns nothing (an empty tensor)
    for what is not asked, so no (V, H) d_weight is ever allocated for a frozen head."""
    hidden, weight, bias, labels, up = make_inputs((2, 29), 80, 1007, torch.bfloat16, DEVICE, seed=22)

    def fn(h, w, b):
        return linear_cross_entropy(h, w, labels, bias=b, shift=1, reduction="none", impl=impl)

    everything = run_with_grads(fn, hidden, weight, bias, up)
    leaves = {"hidden": hidden.clone().requires_grad_(), "weight": weight.clone().requires_grad_(),
              "bias": bias.clone().requires_grad_()}
    leaves[frozen].requires_grad_(False)
    loss = fn(leaves["hidden"], leaves["weight"], leaves["bias"])
    trained = [n for n in ("hidden", "weight", "bias") if n != frozen]
    grads = torch.autograd.grad(loss, [leaves[n] for n in trained], up.to(loss.dtype))
    for name, g in zip(trained, grads):
        assert torch.equal(g, everything[NAMES.index(f"d_{name}")]), name

    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE).reshape(-1)
    h2 = hidden.reshape(-1, hidden.shape[-1])
    _, lse = op.linear_cross_entropy_fwd(h2, weight, bias, targets, IGNORE, impl)
    wanted = [n != frozen for n in ("hidden", "weight", "bias")]
    outs = op.linear_cross_entropy_bwd(up.reshape(-1).float(), h2, weight, bias, targets, lse, IGNORE, impl, *wanted)
    for name, want, out in zip(("hidden", "weight", "bias"), wanted, outs):
        assert (out.numel() > 0) == want, name


@pytest.mark.parametrize("impl", IMPLS)
def test_torch_compile_fullgraph(impl):
    hidden, weight, bias, labels, up = make_inputs((2, 25), 64, 300, torch.float32, DEVICE, seed=15)

    def loss_fn(h, w, b):
        return linear_cross_entropy(h, w, labels, bias=b, shift=1, impl=impl) * 2.0

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    eager = run_with_grads(loss_fn, hidden, weight, bias, up)
    traced = run_with_grads(compiled, hidden, weight, bias, up)
    for name, a, b in zip(NAMES, eager, traced):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


# ---------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_peak_memory_below_the_logits_avoided():
    """Forward + backward at a vocab-sized shape: the memory the op adds on top of its inputs
    (gradients and every scratch buffer included) stays below the fp32 logits of the counted rows."""
    T, H, V = 8192, 1024, 65536
    hidden, weight, _, labels, _ = make_inputs((T,), H, V, torch.bfloat16, "cuda", seed=16, ignore_frac=0.6,
                                               bias=False)
    hidden.requires_grad_()
    weight.requires_grad_()
    counted = int((labels != IGNORE).sum())
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    linear_cross_entropy(hidden, weight, labels).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    logits = counted * V * 4
    assert extra < logits, f"peak extra {extra / 2**20:.0f} MiB >= logits avoided {logits / 2**20:.0f} MiB"


# ---------------------------------------------------------------- gradient filtering (grad_filter_eps)


def test_filter_none_is_the_exact_path(monkeypatch):
    """grad_filter_eps=None (the default) never reaches the filtered backward: its flags, lists and
    block-sparse products are never built, and the gradients are the bits of a call without it."""
    from cocoa_kernels.losses import triton_bwd

    hidden, weight, bias, labels, up = make_inputs((2, 29), 80, 1007, torch.bfloat16, DEVICE, seed=41)

    def fn(eps_kw):
        return lambda h, w, b: linear_cross_entropy(h, w, labels, bias=b, shift=1, reduction="none", impl="triton",
                                                    **eps_kw)

    default = run_with_grads(fn({}), hidden, weight, bias, up)

    def boom(*args, **kwargs):
        raise AssertionError("the filtered backward ran with grad_filter_eps=None")

    for name in ("LiveLists", "sparse_d_weight", "sparse_d_hidden_"):
        monkeypatch.setattr(triton_bwd, name, boom)
    explicit = run_with_grads(fn({"grad_filter_eps": None}), hidden, weight, bias, up)
    for name, a, b in zip(NAMES, default, explicit):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_filter_eps_zero_keeps_every_tile(dtype):
    """eps = 0 skips nothing: the block-sparse products over every tile meet the exact bar
    (float64 truth; shift, bias, partial tiles, several chunks)."""
    hidden, weight, bias, labels, up = make_inputs((2, 37), 80, 1007, DTYPES[dtype], DEVICE, seed=42)

    def fn(h, w, b):
        return linear_cross_entropy(h, w, labels, bias=b, shift=1, reduction="none", impl="triton",
                                    grad_filter_eps=0.0)

    got = run_with_grads(fn, hidden, weight, bias, up)
    truth, base = truth_and_baseline(hidden, weight, labels, bias, up, 1, "none")
    for name, g, t, b in zip(NAMES, got, truth, base):
        assert_close(f"eps=0 {name}", g, t, b, DTYPES[dtype])


def _peaked_inputs(dtype):
    """Logits of std ~0.2 around a bias per vocab range, eps = 1e-3 in mind: targets among the
    first 256 vocab entries (bias +2), vocab 640..767 warm (bias +3: probabilities ~4e-3, kept),
    every other entry cold (bias 0: ~2e-4, at most ~5e-4, skipped unless its tile holds a
    target). Vocab tiles of 128: 0, 1 and 5 are kept, 2-4 and 6-7 skipped, in every row tile."""
    hidden, weight, bias, labels, up = make_inputs((90,), 64, 1007, torch.float32, "cpu", seed=43)
    weight = weight * 0.1
    bias = torch.zeros_like(bias)
    bias[:256] = 2.0
    bias[640:768] = 3.0
    labels = torch.where(labels == IGNORE, labels, labels % 256)
    cast = lambda t: t.to(device=DEVICE, dtype=dtype)  # noqa: E731
    return cast(hidden), cast(weight), cast(bias), labels.to(DEVICE), up.to(DEVICE)


def _filtered_truth(hidden, weight, bias, labels, up, eps, block_m, block_v):
    """float64 gradients with every [block_m counted rows, block_v vocab] tile dropped whose
    entries of softmax - onehot are all below eps (counted rows in order, vocab tiles from 0),
    and the mask of kept tiles."""
    h, w, b = (t.detach().cpu().double() for t in (hidden, weight, bias))
    rows = (labels.cpu() != IGNORE).nonzero().squeeze(1)
    z = h[rows] @ w.T + b
    delta = torch.softmax(z, dim=1)
    delta[torch.arange(rows.numel()), labels.cpu()[rows]] -= 1
    n, V = delta.shape
    keep = torch.zeros(-(-n // block_m), -(-V // block_v), dtype=torch.bool)
    for i in range(keep.shape[0]):
        for j in range(keep.shape[1]):
            tile = delta[i * block_m:(i + 1) * block_m, j * block_v:(j + 1) * block_v]
            keep[i, j] = bool(tile.abs().max() >= eps)
    mask = keep.repeat_interleave(block_m, 0)[:n].repeat_interleave(block_v, 1)[:, :V]
    dz = delta * mask * up.cpu().double()[rows, None]
    d_hidden = torch.zeros_like(h)
    d_hidden[rows] = dz @ w
    return (d_hidden, dz.T @ h[rows], dz.sum(0)), keep


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_filter_skips_exactly_the_quiet_tiles_within_the_bound(dtype):
    """With eps = 1e-3: the gradients equal the float64 gradients with the quiet tiles dropped
    (so the filter keeps the tiles with a target or a warm probability, and only those; vocab
    tiles no row tile keeps get d_weight and d_bias exactly 0), and differ from the exact float64
    gradients by no more than the documented bound eps * g_i * sum_v |W[v, k]| (d_hidden),
    eps * sum_i g_i |h[i, k]| (d_weight), eps * sum_i g_i (d_bias), give or take the exact
    path's own rounding; the loss is unchanged; and the filtered gradients are deterministic."""
    eps = 1e-3
    hidden, weight, bias, labels, up = _peaked_inputs(DTYPES[dtype])
    cfg = config.pick_config(ON_GPU, DTYPES[dtype])

    def fn(eps_value):
        return lambda h, w, b: linear_cross_entropy(h, w, labels, bias=b, reduction="none", impl="triton",
                                                    grad_filter_eps=eps_value)

    exact = run_with_grads(fn(None), hidden, weight, bias, up)
    filtered = run_with_grads(fn(eps), hidden, weight, bias, up)
    again = run_with_grads(fn(eps), hidden, weight, bias, up)
    for name, a, b in zip(NAMES, filtered, again):
        assert torch.equal(a, b), f"filtered {name} differs between two identical runs"
    truth, _ = truth_and_baseline(hidden, weight, labels, bias, up, 0, "none")
    dropped, keep = _filtered_truth(hidden, weight, bias, labels, up, eps, cfg.dz.block_m, cfg.dz.block_v)
    if cfg.dz.block_v == 128:  # the interpreter's tiles, which the inputs are laid out for
        assert keep[:, [0, 1, 5]].all() and not keep[:, [2, 3, 4, 6, 7]].any(), keep
    assert keep.any() and not keep.all(), "the inputs must give both kept and skipped tiles"
    assert torch.equal(filtered[0], exact[0])

    cold = ~keep.any(0).repeat_interleave(cfg.dz.block_v)[: weight.shape[0]]
    assert torch.all(filtered[2][cold.to(DEVICE)] == 0) and torch.all(filtered[3][cold.to(DEVICE)] == 0)
    assert torch.all(exact[3][cold.to(DEVICE)] != 0)

    h = hidden.detach().cpu().double()
    w = weight.detach().cpu().double()
    g = torch.where(labels.cpu() != IGNORE, up.cpu().double(), 0.0)
    bounds = (eps * g[:, None] * w.abs().sum(0)[None, :], eps * (g[:, None] * h.abs()).sum(0)[None, :].expand_as(w),
              eps * g.sum() * torch.ones(w.shape[0], dtype=torch.float64))
    for name, e, f, t, d, bound in zip(NAMES[1:], exact[1:], filtered[1:], truth[1:], dropped, bounds):
        scale = t.abs().max().item()
        rounding = 2 * (e.cpu().double() - t).abs().max().item() + EPS[DTYPES[dtype]] * scale
        f = f.cpu().double()
        assert (f - d).abs().max().item() <= rounding, f"{name}: not the tiles the filter should skip"
        assert ((f - t).abs() - bound).max().item() <= rounding, f"{name}: change beyond the documented bound"


@pytest.mark.parametrize(
    "eps, exc, match",
    [(-0.1, ValueError, r"grad_filter_eps must be in \[0, 1\]"), (1.5, ValueError, r"must be in \[0, 1\]"),
     (float("nan"), ValueError, r"must be in \[0, 1\]"), ("1e-3", TypeError, "grad_filter_eps must be None or a float"),
     (True, TypeError, "grad_filter_eps must be None or a float")],
    ids=["negative", "above-one", "nan", "string", "bool"],
)
def test_filter_eps_errors(eps, exc, match):
    h, w, b, y, _ = make_inputs((2, 5), 16, 10, torch.float32, DEVICE, seed=44)
    with pytest.raises(exc, match=match):
        linear_cross_entropy(h, w, y, bias=b, grad_filter_eps=eps)


@pytest.mark.parametrize("counted", [0.4, 0.1, 1.0], ids=["40pct", "10pct", "all"])
def test_forward_splits_fill_the_last_wave(counted):
    """The forward's vocab splits are sized from the counted rows: at the goal shape (16,384
    tokens, V 151,936) on 132 SMs the busiest SM's work is within 2% of a perfect spread
    (row tiles x vocab tiles / SMs), where splits sized for all 16,384 rows left the last wave
    ~11% idle at 40% counted."""
    cfg = config.pick_config(True, torch.bfloat16)
    rows, V, sms = round(counted * 16384), 151_936, 132
    splits, split_cols = config.fwd_splits(cfg, rows, V, sms)
    row_tiles = -(-rows // cfg.fwd.block_m)
    vocab_tiles = -(-V // cfg.fwd.block_v)
    assert split_cols % cfg.fwd.block_v == 0 and (splits - 1) * split_cols < V <= splits * split_cols
    span = config.fwd_makespan(row_tiles, vocab_tiles, splits, sms)
    ideal = row_tiles * vocab_tiles / sms
    assert span <= 1.02 * ideal, (splits, span, ideal)
    pinned = config.LossConfig(fwd=cfg.fwd, dz=cfg.dz, products=cfg.products, fwd_splits=5)
    assert config.fwd_splits(pinned, rows, V, sms)[0] == 5
