"""The CUDA backend: mamba_ssm's selective-scan kernel, and only that kernel.

mamba_ssm also ships fused functions (`mamba_inner_fn` and friends) that take the raw weight tensors of
in_proj, x_proj, dt_proj and out_proj; calling those would silently skip any adapter wrapped around those
layers. We never use them: the mixer calls its projections as modules and hands only the scan to the
kernel. The kernel takes no initial state, so calls that pass one use the exact sequential backend
(pure torch, it runs on CUDA tensors too).
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def kernel():
    """mamba_ssm's `selective_scan_fn`, or None where mamba_ssm is not installed or has no CUDA build."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # ImportError, or a broken CUDA extension
        return None
    return selective_scan_fn
