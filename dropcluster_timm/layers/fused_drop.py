""" Fused DropCluster mask application.

``drop_cluster`` ends with a small keep table ``keep`` of shape ``(draws, G, K)`` (one scaled keep
factor per draw, channel group and cluster) and the cluster labels ``idx`` of shape ``(M, n)``, and
applies them as ``x * keep.gather(2, idx)``. That floor materialises a ``(draws, G, *spatial)`` mask,
which is as large as ``x`` when ``draws = B`` and ``G = C``: the multiply then reads x and the mask and
writes the output, and autograd keeps the mask alive until the backward.

``apply_cluster_keep`` fuses gather and multiply: each element looks its factor up in the table
(``keep[b, c, idx[c, s]]``, with draws, G and M broadcast), so x is read once, the output written once,
and the table and labels are small enough to stay in cache. The backward is the same op applied to
the incoming gradient, so only ``idx`` and ``keep`` are saved, never a full-size mask.

It is the custom op ``dropcluster::apply_cluster_keep`` (traced by ``torch.compile`` without graph
breaks): a Triton kernel for CUDA tensors, the plain torch expression elsewhere and under TorchScript.
Results are bit-identical to the torch expression for float32, bfloat16 and float16: both multiply two
values of x's dtype in float32 and round once (for the half types the float32 product is exact).
"""
from contextlib import nullcontext
from typing import Optional, Tuple

import torch
from torch import Tensor

from .cluster_mask import cluster_keep_mask

try:
    import triton
    import triton.language as tl
except Exception:  # missing or broken: CUDA tensors take the reference path
    triton = None

__all__ = ['apply_cluster_keep', 'apply_cluster_keep_reference']

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BLOCK = 1024


def _check_args(x: Tensor, idx: Tensor, keep: Tensor) -> int:
    """Raise ValueError unless the shapes broadcast as in ``drop_cluster``; returns ``n``."""
    if x.dim() < 3 or not x.is_floating_point():
        raise ValueError('apply_cluster_keep expects a floating point x of shape (B, C, *spatial), got '
                         + str(x.dim()) + ' dims of ' + str(x.dtype))
    if idx.dim() != 2 or idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
        raise ValueError('idx must be integer cluster labels of shape (M, n), got shape '
                         + str(list(idx.shape)) + ' of ' + str(idx.dtype))
    if keep.dim() != 3 or not keep.is_floating_point():
        raise ValueError('keep must be a floating point table of shape (draws, G, K), got shape '
                         + str(list(keep.shape)) + ' of ' + str(keep.dtype))
    n = 1
    for s in x.shape[2:]:
        n *= s
    B = x.shape[0]
    C = x.shape[1]
    draws = keep.shape[0]
    G = keep.shape[1]
    M = idx.shape[0]
    if draws != 1 and draws != B:
        raise ValueError('keep has ' + str(draws) + ' draws, expected 1 or the batch size ' + str(B))
    if G != 1 and G != C:
        raise ValueError('keep has ' + str(G) + ' channel groups, expected 1 or the channel count ' + str(C))
    if M != 1 and M != G:
        raise ValueError('idx has ' + str(M) + ' maps, expected 1 or the channel groups of keep (' + str(G) + ')')
    if idx.shape[1] != n:
        raise ValueError('idx has ' + str(idx.shape[1]) + ' labels per map, expected the '
                         + str(n) + ' spatial elements of x')
    if keep.shape[2] < 1:
        raise ValueError('keep must hold at least one cluster')
    if idx.device != x.device or keep.device != x.device:
        raise ValueError('x, idx and keep must be on one device, got ' + str(x.device) + ', '
                         + str(idx.device) + ', ' + str(keep.device))
    return n


def apply_cluster_keep_reference(x: Tensor, idx: Tensor, keep: Tensor) -> Tensor:
    """``x * keep.to(x.dtype)[d, g, idx[m, s]]`` in plain torch (the floor the fused op matches)."""
    _check_args(x, idx, keep)
    return x * cluster_keep_mask(x, idx, keep)


def apply_cluster_keep(x: Tensor, idx: Tensor, keep: Tensor) -> Tensor:
    """Multiply ``x`` by its per-cluster keep factors, without a full-size mask.

    Args:
        x: input ``(B, C, *spatial)``, floating point, any memory format.
        idx: integer cluster labels ``(M, n)`` or ``(M, *spatial)``, M = 1 or G, labels in ``[0, K)``
            (not checked: that would synchronise with the device).
        keep: keep factors ``(draws, G, K)``, draws = 1 or B, G = 1 or C; cast to ``x.dtype`` as in
            ``drop_cluster``. Neither ``idx`` nor ``keep`` gets a gradient.

    Returns:
        ``x * keep.to(x.dtype)[d, g, idx[m, s]]``, in x's memory format when x is dense.
    """
    if idx.dim() > 2:
        idx = idx.reshape(idx.shape[0], -1)
    if torch.jit.is_scripting():
        # A scripted module must not depend on this Python module being imported where it is loaded.
        return apply_cluster_keep_reference(x, idx, keep)
    return torch.ops.dropcluster.apply_cluster_keep(x, idx, keep)  # each implementation checks the arguments once


@torch.library.custom_op('dropcluster::apply_cluster_keep', mutates_args=())
def _apply_cluster_keep_op(x: Tensor, idx: Tensor, keep: Tensor) -> Tensor:
    """The reference, used on every device without a registered kernel (the CPU among them)."""
    _check_args(x, idx, keep)
    # Into empty_like(x), the layout the fake and CUDA implementations promise.
    return torch.mul(x, cluster_keep_mask(x, idx, keep), out=torch.empty_like(x))


@_apply_cluster_keep_op.register_fake
def _apply_cluster_keep_fake(x: Tensor, idx: Tensor, keep: Tensor) -> Tensor:
    _check_args(x, idx, keep)
    return torch.empty_like(x)


def _setup_context(ctx, inputs: Tuple[Tensor, Tensor, Tensor], output: Tensor) -> None:
    _, idx, keep = inputs
    ctx.save_for_backward(idx, keep)


def _backward(ctx, grad: Tensor) -> Tuple[Tensor, None, None]:
    idx, keep = ctx.saved_tensors
    # d(x * mask)/dx = mask: the same op on the gradient, itself differentiable.
    return torch.ops.dropcluster.apply_cluster_keep(grad, idx, keep), None, None


_apply_cluster_keep_op.register_autograd(_backward, setup_context=_setup_context)


def _channels_last(t: Tensor) -> Optional[bool]:
    """False for a dense NC* layout, True for a dense N*C one (channels_last, channels_last_3d), else None."""
    if t.is_contiguous():
        return False
    if t.movedim(1, -1).is_contiguous():
        return True
    return None


if triton is not None:
    @triton.jit
    def _cluster_keep_kernel(
            x_ptr, idx_ptr, keep_ptr, out_ptr,
            N, C, n,
            idx_stride_c, keep_stride_b, keep_stride_c,
            CHANNELS_LAST: tl.constexpr,
            WIDE: tl.constexpr,
            BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        if WIDE:
            pid = pid.to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        valid = offs < N
        # x and out share one dense layout, so the memory position alone gives (b, c, s).
        if CHANNELS_LAST:
            c = offs % C
            bs = offs // C
            s = bs % n
            b = bs // n
        else:
            s = offs % n
            bc = offs // n
            c = bc % C
            b = bc // C
        # Broadcast dims have stride 0; labels and table are reused by every sample, keep them cached
        # and let x and out (touched once) go first.
        label = tl.load(idx_ptr + c * idx_stride_c + s, mask=valid, other=0)
        k = tl.load(keep_ptr + b * keep_stride_b + c * keep_stride_c + label, mask=valid, other=0.0)
        v = tl.load(x_ptr + offs, mask=valid, other=0.0, eviction_policy='evict_first')
        # The product of two half values is exact in float32, so its one rounding (to nearest even)
        # matches torch's. The interpreter (TRITON_INTERPRET=1) truncates float32 to bfloat16 instead.
        y = v.to(tl.float32) * k.to(tl.float32)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=valid, eviction_policy='evict_first')


def _launch(x: Tensor, idx: Tensor, keep: Tensor, out: Tensor, channels_last: bool) -> None:
    """Launch the Triton kernel: ``out = x * table[...]``, x and out dense in one layout (``channels_last``)."""
    N = x.numel()
    C = x.shape[1]
    n = N // (x.shape[0] * C)
    table = keep.to(x.dtype).contiguous()
    idx = idx.contiguous()
    draws, G, K = table.shape
    grid = (triton.cdiv(N, _BLOCK),)
    # Triton launches on the current device, which need not be x's.
    with torch.cuda.device(x.device) if x.is_cuda else nullcontext():
        _cluster_keep_kernel[grid](
            x, idx, table, out,
            N, C, n,
            n if idx.shape[0] > 1 else 0, G * K if draws > 1 else 0, K if G > 1 else 0,
            CHANNELS_LAST=channels_last,
            WIDE=max(N + _BLOCK, table.numel()) >= 2 ** 31,
            BLOCK=_BLOCK,
        )


def _apply_cuda(x: Tensor, idx: Tensor, keep: Tensor) -> Tensor:
    """The CUDA implementation: the Triton kernel where it applies, the reference otherwise."""
    _check_args(x, idx, keep)
    out = torch.empty_like(x)
    if out.numel() == 0:
        return out
    layout = _channels_last(out)
    if triton is None or x.dtype not in _KERNEL_DTYPES or layout is None:
        # float64, no Triton, or a dense layout the kernel does not decode (C neither right after B
        # nor innermost): the torch floor, still into out.
        return torch.mul(x, cluster_keep_mask(x, idx, keep), out=out)
    if _channels_last(x) != layout:
        # Non-dense x (a slice, an expanded gradient): one copy into out's layout, then the kernel.
        x = x.contiguous() if not layout else x.movedim(1, -1).contiguous().movedim(-1, 1)
    _launch(x, idx, keep, out, layout)
    return out


_apply_cluster_keep_op.register_kernel('cuda')(_apply_cuda)
