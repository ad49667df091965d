"""Benchmarks of the cocoa kernels against their peers, written as data (see bench/README.md).

    python -m bench                      # every benchmark on the GPU, JSON under bench/results/
    python -m bench --smoke --out DIR    # tiny sizes on the CPU: the harness, not the speed
    python -m bench.render RESULTS.json  # Markdown table and PNG plot from a results file
    bash bench/gpu_check.sh [OUT_DIR]    # the one command for a GPU machine: tests, then benchmarks

Modules, one job each: ``workloads`` (shapes, masks, inputs), ``attention_impls`` and
``loss_impls`` (one adapter per implementation), ``e2e`` (a training step of a Qwen2-VL-2B
shaped model), ``timing`` (device clocks, medians, peak memory), ``measure`` (a timed row,
errors turned into notes), ``budget`` (time limits per section), ``schema`` (the row format and
its check), ``environment`` (device and versions), ``runner`` (the sections), ``render``.
Nothing here is imported by ``cocoa`` or ``cocoa_kernels``.
"""
