"""pytest-benchmark view of the same workloads: ``pytest bench/ --benchmark-only`` on a GPU.

A thin layer over the workload builders and adapters of ``python -m bench`` (which is what
writes the results JSON and the README tables); this file only lets pytest-benchmark's
comparison tooling (``--benchmark-autosave``, ``--benchmark-compare``) see the same calls.
Skipped without CUDA or without pytest-benchmark. ``pytest tests/`` never collects it.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("pytest_benchmark")
if not torch.cuda.is_available():
    pytest.skip("benchmarks need a CUDA device", allow_module_level=True)

from bench import attention_impls, loss_impls, workloads  # noqa: E402
from bench.measure import Unavailable  # noqa: E402

DEVICE = torch.device("cuda")
ROUNDS, WARMUP = 20, 3


def _pedantic(benchmark, fn):
    def run():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)


@pytest.mark.parametrize("impl", list(attention_impls.IMPLS))
@pytest.mark.parametrize("workload", workloads.attention_workloads(), ids=lambda w: w.name)
def test_attention_fwdbwd(benchmark, workload, impl):
    shape = workloads.FULL_ATTN
    mask = workload.mask(DEVICE)
    try:
        prepared = attention_impls.IMPLS[impl].prepare(workload, mask, shape, DEVICE)
    except Unavailable as e:
        pytest.skip(str(e))
    if not prepared.backward:
        pytest.skip(prepared.backward_note or "no backward here")
    (x,) = workloads.make_attention_inputs(workload.n, shape, DEVICE, copies=1)
    benchmark.extra_info.update(workload=workload.name, impl=impl, n=workload.n,
                                visible_pairs=workloads.visible_pairs(mask))
    _pedantic(benchmark, lambda: torch.autograd.grad(prepared.call(x), x.leaves, x.dout))


@pytest.mark.parametrize("impl", list(loss_impls.IMPLS))
def test_loss_fwdbwd(benchmark, impl):
    w = workloads.FULL_LOSS
    try:
        prepared = loss_impls.IMPLS[impl].prepare(w, DEVICE)
    except Unavailable as e:
        pytest.skip(str(e))
    weight, (x,) = workloads.make_loss_inputs(w, DEVICE, copies=1)
    benchmark.extra_info.update(workload=w.name, impl=impl)
    _pedantic(benchmark, lambda: torch.autograd.grad(prepared.call(weight, x), (x.hidden, weight)))
