"""The autograd end of every op that forms its input gradients in the forward pass
(``linear_nll``, ``fastalign.ops.sequence_loss``): backward only scales them.

They are scaled in place and handed over, not copied: a copy would hold a second dW ([V, H],
the size of the head) at the peak of backward, more than the whole chunked workspace. So one
forward feeds one backward; a second backward through the same graph (``retain_graph=True``)
is refused with an error rather than answered with gradients scaled twice.
"""

from __future__ import annotations

import torch

__all__ = ["GradientsFormedInForward"]


class GradientsFormedInForward(torch.autograd.Function):
    """``apply(hidden, weight, bias, loss, dh, dw, db)`` → a copy of the 0-d ``loss`` whose
    backward returns ``(dh, dw, db) · grad_loss`` for (hidden, weight, bias)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, loss, dh, dw, db):
        ctx.formed = [dh, dw, db]  # not save_for_backward: they are outputs of no graph
        ctx.set_materialize_grads(False)
        return loss.clone()  # a fresh tensor: callers may scale the loss in place

    @staticmethod
    def backward(ctx, grad_loss):
        formed = ctx.formed
        if formed is None:
            raise RuntimeError(
                "backward ran twice through a loss whose gradients were formed in its forward "
                "pass (fastalign.linear_nll / the fused loss modules): they were handed over the "
                "first time. Run the forward pass again instead of retain_graph=True, or use "
                "gradients_in_forward=False / linear_logprobs")
        ctx.formed = None
        if grad_loss is None:
            return (None,) * 7
        grads = [None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in formed]
        return (*grads, None, None, None, None)
