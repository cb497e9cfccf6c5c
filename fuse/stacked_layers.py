"""The layers of a stacked model (:mod:`fuse.stack`): M members' Linear and LayerNorm weights as one
(M, ...) parameter, computed member by member with the kernel a plain Linear runs (CPU), or as one
batched matmul (CUDA), so that a member's numbers do not depend on the stack it is in."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from mmcache.fuse.heads import Attention
from torch import Tensor, nn

__all__ = ["ALIGN", "BatchedLinear", "StackedLayerNorm", "StackedLinear", "aligned", "per_member_linear",
           "per_member_linear_backward", "stacked_values"]


class BatchedLinear(torch.autograd.Function):
    """y = x @ W^T + b per member: x (M, N, in), W (M, out, in), b (M, out) -> (M, N, out). Written out so
    the weight gradient comes out as (M, out, in) contiguous (autograd's own would be a transposed copy).

    Under autocast (bf16 on CUDA) it computes as ``F.linear`` does there: x, W and b cast to the autocast
    dtype, y in that dtype; the gradients are computed in it too and land as float32 in the buffers,
    as autograd's cast-backward gives a plain Linear's float32 weights."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor, gw: Tensor | None, gb: Tensor | None) -> Tensor:
        """``gw`` / ``gb``: where the weight / bias gradients go (views of the stack's gradient buffer,
        so no step allocates them afresh), or None."""
        ctx.x_dtype, ctx.out = x.dtype, (gw, gb)
        kind = x.device.type
        if not torch.is_autocast_enabled(kind):  # float32: no casts, no context on the hot path
            ctx.save_for_backward(x, w)
            if kind == "cpu":
                return per_member_linear(x, w, b)
            return torch.baddbmm(b[:, None], x, w.transpose(1, 2))
        dtype = torch.get_autocast_dtype(kind)
        x, w, b = x.to(dtype), w.to(dtype), b.to(dtype)
        ctx.save_for_backward(x, w)
        with torch.autocast(kind, enabled=False):
            return torch.baddbmm(b[:, None], x, w.transpose(1, 2))

    @staticmethod
    def backward(ctx, g: Tensor):
        x, w = ctx.saved_tensors
        gw, gb = ctx.out
        g = g.to(x.dtype)
        gx = torch.bmm(g, w).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        if g.device.type == "cpu" and g.dtype == x.dtype == torch.float32:
            return per_member_linear_backward(g, x, w, gw, gb, ctx.needs_input_grad[0])
        if gw is None:
            gw, gb = torch.bmm(g.transpose(1, 2), x).float(), g.float().sum(1)
        elif g.dtype == gw.dtype:
            torch.bmm(g.transpose(1, 2), x, out=gw)
            torch.sum(g, 1, out=gb)
        else:  # reduced precision: computed in it, stored as float32
            gw.copy_(torch.bmm(g.transpose(1, 2), x))
            gb.copy_(g.float().sum(1))
        return gx, gw, gb, None, None


ALIGN = 64  # bytes; torch's CPU allocator aligns every new tensor to this


def aligned(t: Tensor) -> Tensor:
    """``t`` itself when it starts on a 64-byte boundary (as a fresh tensor does), else an aligned copy.
    MKL's gemm may sum in another order for operands at another alignment (measured: member 1's weight
    gradient in a stack of 3 differed from the same member alone in the last bits, with identical inputs),
    and a member's slice of a stacked tensor starts wherever the members before it end."""
    return t if t.data_ptr() % ALIGN == 0 else t.clone()


def per_member_linear(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """x (M, N, in), w (M, out, in), b (M, out) -> (M, N, out) float32, one ``addmm`` per member on aligned
    operands: the kernel and shapes ``F.linear`` runs for one model, so member m's rows are bit for bit those
    of a plain Linear and cannot depend on M. (One ``baddbmm`` for all members is not: with 2 threads MKL
    splits the batch by M, and member results then differ in the last bits with the stack's size.)"""
    x = x.contiguous()
    y = x.new_empty(x.shape[0], x.shape[1], w.shape[1])
    for k in range(x.shape[0]):
        out = torch.addmm(aligned(b[k]), aligned(x[k]), aligned(w[k]).t())
        y[k].copy_(out)
    return y


def per_member_linear_backward(g: Tensor, x: Tensor, w: Tensor, gw: Tensor | None, gb: Tensor | None,
                                need_gx: bool) -> tuple:
    """Backward of :func:`per_member_linear` member by member, with the ops autograd runs for a plain
    Linear (dx = g W, dW = g^T x, db = sum over rows) on aligned operands, so the gradients are
    grouping-independent too."""
    # Contiguous first: the incoming gradient's strides can differ with M (size-1 dims).
    m, g, x = x.shape[0], g.contiguous(), x.contiguous()
    gx = torch.empty_like(x) if need_gx else None
    if gw is None:
        gw, gb = x.new_empty(m, g.shape[2], x.shape[2]), x.new_empty(m, g.shape[2])
    for k in range(m):
        gk, xk = aligned(g[k]), aligned(x[k])
        if gx is not None:
            gx[k].copy_(torch.mm(gk, aligned(w[k])))
        gw[k].copy_(torch.mm(gk.t(), xk))
        gb[k].copy_(gk.sum(0))
    return gx, gw, gb, None, None


class StackedLinear(nn.Module):
    """``M`` Linear layers at once. Input (M*b, ..., in), rows member-major -> (M*b, ..., out).
    ``weight`` (M, out, in) and ``bias`` (M, out) are views of the stack's flat parameters."""

    weight: Tensor
    bias: Tensor
    weight_grad: Tensor | None = None  # (M, out, in) / (M, out) views of the stack's gradient buffer
    bias_grad: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        return self.rows(x, 0, self.weight.shape[1])

    def rows(self, x: Tensor, start: int, end: int) -> Tensor:
        """Output features ``start:end`` only (the value half of a kv projection)."""
        m = self.weight.shape[0]
        if (start, end) == (0, self.weight.shape[1]):
            w, b, gw, gb = self.weight, self.bias, self.weight_grad, self.bias_grad
        else:
            w, b, gw, gb = self.weight[:, start:end], self.bias[:, start:end], None, None
        y = BatchedLinear.apply(x.reshape(m, -1, x.shape[-1]), w, b, gw, gb)
        return y.reshape(*x.shape[:-1], end - start)


class StackedLayerNorm(nn.Module):
    """``M`` LayerNorms at once; (M*b, ..., D) member-major. ``weight``, ``bias``: (M, D) views."""

    weight: Tensor
    bias: Tensor

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        m, d = self.weight.shape
        y = F.layer_norm(x, (d,), None, None, self.eps).reshape(m, -1, d)
        return torch.addcmul(self.bias[:, None], y, self.weight[:, None]).reshape(x.shape)


def stacked_values(self: Attention, kv_in: Tensor) -> Tensor:
    return self.kv.rows(kv_in, kv_in.shape[-1], 2 * kv_in.shape[-1])


