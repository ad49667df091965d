"""The sections of a run (attention, loss, sweep, e2e): for each workload build the inputs once,
then measure every implementation on them in turn, one row each, appended to the results file
as soon as it is measured."""

from __future__ import annotations

import contextlib

import traceback
from dataclasses import dataclass

import torch

from . import attention_impls, e2e, loss_impls, workloads
from .budget import Budget
from .environment import l2_bytes
from .measure import Prepared, Unavailable, error_note, measure
from .schema import ResultsFile, add_note, new_row
from .timing import SMOKE, Policy, free_memory

SECTIONS = ("attention", "loss", "sweep", "e2e")  # a plain run (GPU) or --smoke
# python -m bench --cpu: our PyTorch attention path vs SDPA (bench/cpu_attention.py), our CPU loss
# vs torch's F.linear_cross_entropy and plain PyTorch, one process per row (bench/cpu_loss.py)
CPU_SECTIONS = ("cpu", "cpu_loss")
REL_ERR_WARN = 2e-2  # bf16 outputs of two correct implementations differ by ~1e-3


@dataclass
class RunOptions:
    device: torch.device
    smoke: bool
    sections: tuple[str, ...]
    attention_impls: tuple[str, ...]
    loss_impls: tuple[str, ...]
    e2e_impls: tuple[str, ...]
    e2e_layers: int | None
    sweep_sizes: tuple[int, ...] | None
    policy: Policy
    e2e_policy: Policy


def _rel_err(out: torch.Tensor, ref: torch.Tensor | None) -> float | None:
    if ref is None:
        return None
    out = out.detach().float()
    denom = ref.norm().item()
    return (out - ref).norm().item() / denom if denom > 0 else (out - ref).norm().item()


def _check_against_ours(row: dict, out: torch.Tensor, ref: torch.Tensor | None) -> None:
    err = _rel_err(out, ref)
    row["rel_err_vs_ours"] = err
    if err is not None and not err <= REL_ERR_WARN:
        add_note(row, f"output differs from ours (rel. err. {err:.2e}): check the mask given to this impl")


def _record_loss_value(row: dict, impl, compute, reference):
    """Record ``compute()``'s loss in the row; ours becomes the reference the peers are compared
    with. Returns the reference."""
    try:
        value = compute().detach().float().reshape(())
        row["loss_value"] = value.item()
        if impl.ours:
            return value
        _check_against_ours(row, value, reference)
    except Exception as e:
        add_note(row, f"output check: {error_note(e)}")
    return reference


def _prepare(impl, row, budget: Budget, section: str, *args):
    """impl.prepare(*args) with its info copied into the row, or None with the reason in the
    row's note: the section's time is spent, the impl is unavailable, or its set-up failed."""
    if budget.expired(section):
        add_note(row, budget.skip_note(section))
        return None
    try:
        prepared = impl.prepare(*args)
    except Unavailable as e:
        add_note(row, str(e))
        return None
    except Exception as e:
        add_note(row, f"set-up: {error_note(e)}")
        return None
    row.update(prepared.info)
    return prepared


def run_attention(opts: RunOptions, results: ResultsFile, budget: Budget, section: str) -> None:
    shape = workloads.SMOKE_ATTN if opts.smoke else workloads.FULL_ATTN
    if section == "sweep":
        cases = workloads.sweep_workloads(opts.smoke, opts.sweep_sizes)
    else:
        cases = workloads.attention_workloads(opts.smoke)
    device = opts.device
    # Ours with a setting changed (pointer vs TMA forward, deterministic or not, autotuned) run on
    # the main workloads only: the sweep compares with the peers.
    names = [n for n in opts.attention_impls if section != "sweep" or not getattr(attention_impls.IMPLS[n], "variant", False)]
    for w in cases:
        if budget.expired(section):
            for name in names:
                results.add(_skipped("attention", w.name, name, budget, section, group=w.group, n_tokens=w.n,
                                     ours=attention_impls.IMPLS[name].ours))
            continue
        try:
            mask = w.mask(device)
            pairs = workloads.visible_pairs(mask)
            flops = workloads.attention_flops(pairs, shape)
            copies = workloads.copies_for(workloads.attention_copy_bytes(w.n, shape), l2_bytes(device))
            inputs = workloads.make_attention_inputs(w.n, shape, device, copies)
        except Exception as e:
            for name in names:
                row = new_row("attention", w.name, name, ours=attention_impls.IMPLS[name].ours, group=w.group, n_tokens=w.n)
                add_note(row, f"workload set-up: {error_note(e)}")
                results.add(row)
            free_memory(device)
            continue
        reference = None
        for name in names:
            impl = attention_impls.IMPLS[name]
            row = new_row("attention", w.name, name, ours=impl.ours, group=w.group, n_tokens=w.n, visible_pairs=pairs)
            prepared = _prepare(impl, row, budget, section, w, mask, shape, device)
            if prepared is not None:
                try:
                    out = _measure_attention(row, prepared, inputs, copies, device, opts.policy, flops)
                    if out is not None:
                        if impl.ours and reference is None:  # the default row; variants are checked against it
                            reference = out.float()
                        else:
                            _check_against_ours(row, out, reference)
                except Exception as e:  # measure() records its own errors; this is a last resort
                    add_note(row, error_note(e))
            results.add(row)
            del prepared
            free_memory(device)
        del inputs, mask
        free_memory(device)


def _measure_attention(row, prepared: Prepared, inputs, copies, device, policy, flops):
    with (prepared.setting or contextlib.nullcontext)():
        return _measure_attention_calls(row, prepared, inputs, copies, device, policy, flops)


def _measure_attention_calls(row, prepared: Prepared, inputs, copies, device, policy, flops):
    def fwd(i):
        return prepared.call(inputs[i])

    def fwdbwd(i):
        x = inputs[i]
        return torch.autograd.grad(prepared.call(x), x.leaves, x.dout)

    measure(row, fwd, fwdbwd if prepared.backward else None, copies, device, policy, flops, prepared.backward_note)
    if row["fwd_ms"] is None:
        return None
    try:
        # With autograd on, as timed: under no_grad a compiled impl would compile a second graph.
        return prepared.call(inputs[0]).detach()
    except Exception as e:
        add_note(row, f"output check: {error_note(e)}")
        return None


def run_loss(opts: RunOptions, results: ResultsFile, budget: Budget, section: str = "loss") -> None:
    w = workloads.SMOKE_LOSS if opts.smoke else workloads.FULL_LOSS
    device = opts.device
    extra = dict(group="main", n_tokens=w.tokens, counted_tokens=w.counted, hidden=w.hidden, vocab=w.vocab)
    try:
        copies = workloads.copies_for(workloads.loss_copy_bytes(w), l2_bytes(device))
        weight, inputs = workloads.make_loss_inputs(w, device, copies)
    except Exception as e:
        for name in opts.loss_impls:
            row = new_row("loss", w.name, name, ours=loss_impls.IMPLS[name].ours, **extra)
            add_note(row, f"workload set-up: {error_note(e)}")
            results.add(row)
        free_memory(device)
        return
    flops = workloads.loss_flops(w)
    reference = None
    for name in opts.loss_impls:
        impl = loss_impls.IMPLS[name]
        row = new_row("loss", w.name, name, ours=impl.ours, **extra)
        prepared = _prepare(impl, row, budget, section, w, device)
        if prepared is not None:
            def fwd(i, call=prepared.call):
                return call(weight, inputs[i])

            def fwdbwd(i, call=prepared.call):
                x = inputs[i]
                return torch.autograd.grad(call(weight, x), (x.hidden, weight))

            measure(row, fwd, fwdbwd, copies, device, opts.policy, flops)
            if row["fwd_ms"] is not None:
                reference = _record_loss_value(row, impl, lambda: prepared.call(weight, inputs[0]), reference)
        results.add(row)
        del prepared
        free_memory(device)


def run_e2e(opts: RunOptions, results: ResultsFile, budget: Budget, section: str = "e2e") -> dict | None:
    device = opts.device
    if budget.expired(section):
        for name in opts.e2e_impls:
            results.add(_skipped("e2e", e2e.stage2_workload(opts.smoke).name, name, budget, section,
                                 ours=e2e.IMPLS[name].ours))
        return None
    try:
        s = e2e.setup(device, opts.smoke, opts.e2e_layers)
    except Exception as e:
        for name in opts.e2e_impls:
            row = new_row("e2e", e2e.stage2_workload(opts.smoke).name, name, ours=e2e.IMPLS[name].ours)
            add_note(row, f"model set-up: {error_note(e)}")
            results.add(row)
        free_memory(device)
        return None
    n = s.workload.n
    reference = None
    for name in opts.e2e_impls:
        impl = e2e.IMPLS[name]
        row = new_row("e2e", s.workload.name, name, ours=impl.ours, group="main", n_tokens=n,
                      layers=s.config_summary["layers"])
        prepared = _prepare(impl, row, budget, section, s, device)
        if prepared is not None:
            def fwd(i, call=prepared.call):
                return call()

            def step(i, call=prepared.call):
                s.model.zero_grad(set_to_none=True)
                call().backward()

            measure(row, fwd, step, 1, device, opts.e2e_policy, None)
            s.model.zero_grad(set_to_none=True)
            if row["fwdbwd_ms"]:
                row["tokens_per_s"] = n / (row["fwdbwd_ms"] / 1e3)
            if row["fwd_ms"] is not None:
                reference = _record_loss_value(row, impl, prepared.call, reference)
        results.add(row)
        del prepared
        free_memory(device)
    return s.config_summary


def _skipped(op, workload, impl, budget, section, **extra):
    row = new_row(op, workload, impl, **extra)
    add_note(row, budget.skip_note(section))
    return row


def run(opts: RunOptions, results: ResultsFile, budget: Budget, log=print) -> None:
    for section in opts.sections:
        log(f"[bench] {section} (t = {budget.elapsed_s():.0f} s)")
        budget.begin(section)
        if section not in SECTIONS + CPU_SECTIONS:
            raise ValueError(f"unknown section {section!r}")
        try:
            if section in ("attention", "sweep"):
                run_attention(opts, results, budget, section)
            elif section == "cpu":
                from .cpu_attention import run_cpu_attention

                run_cpu_attention(opts, results, budget, section)
            elif section == "cpu_loss":
                from .cpu_loss import run_cpu_loss

                run_cpu_loss(opts, results, budget, section)
            elif section == "loss":
                run_loss(opts, results, budget)
            else:
                summary = run_e2e(opts, results, budget)
                if summary is not None:
                    results.data.setdefault("config", {})["e2e"] = summary
                    results.write()
        except Exception:  # a bug in the harness: keep the rows so far and go on with the next section
            log(f"[bench] section {section!r} stopped by an unexpected error:\n{traceback.format_exc()}")
        free_memory(opts.device)  # the section's inputs (and the e2e model) are gone by now


def default_policies(smoke: bool, cpu: bool = False) -> tuple[Policy, Policy]:
    if smoke:
        return SMOKE, SMOKE
    if cpu:  # seconds-long calls on a shared 2-core machine: more runs behind each median
        return Policy(warmup=2, min_reps=9, max_reps=41, target_ms=6000.0), SMOKE
    return Policy(warmup=3, min_reps=5, max_reps=50, target_ms=300.0), Policy(warmup=2, min_reps=3, max_reps=5, target_ms=2000.0)
