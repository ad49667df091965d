"""Where and with what a run happened: device name, versions of the stack and of the peers."""

from __future__ import annotations

import datetime
import importlib.metadata
import importlib.util
import os
import platform
import re

import torch

# Distribution name -> import name, for the peers measured against.
PEERS = {
    "flash-attn": "flash_attn",
    "flash-attn-3": "flash_attn_interface",
    "liger-kernel": "liger_kernel",
    "cut-cross-entropy": "cut_cross_entropy",
}


def dist_version(dist: str, module: str | None = None) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        if module and importlib.util.find_spec(module) is not None:
            return str(getattr(importlib.import_module(module), "__version__", "unknown"))
    except Exception as e:  # a broken install is reported, not fatal
        return f"import failed: {type(e).__name__}"
    return None


def versions() -> dict:
    import triton
    import transformers

    try:
        import cocoa_kernels

        ours = cocoa_kernels.__version__
    except Exception as e:  # pragma: no cover - the package is the point of the repository
        ours = f"import failed: {e}"
    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "cocoa": ours,
        "matplotlib": dist_version("matplotlib"),
        "peers": {dist: dist_version(dist, module) for dist, module in PEERS.items()},
    }
    return out


def device_info(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"name": "cpu", "slug": "cpu", "processor": platform.processor() or platform.machine(),
                "model": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads()}
    props = torch.cuda.get_device_properties(device)
    name = torch.cuda.get_device_name(device)
    return {
        "name": name,
        "slug": slug(name),
        "capability": f"{props.major}.{props.minor}",
        "sm_count": props.multi_processor_count,
        "memory_gb": round(props.total_memory / 2**30, 1),
        "l2_mb": round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
    }


def cpu_model() -> str | None:
    """The CPU's model name (Linux ``/proc/cpuinfo``), or None where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def l2_bytes(device: torch.device) -> int:
    """The device's L2 cache size (what input rotation must exceed); 0 on the CPU."""
    if device.type != "cuda":
        return 0
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20))


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def today() -> str:
    return datetime.datetime.now(datetime.timezone.utc).date().isoformat()
