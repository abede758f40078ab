"""Batch normalisation over the global batch of every DDP process, on any device.

``torch.nn.SyncBatchNorm`` only runs on GPUs. :class:`GlobalBatchNorm` computes the same thing with
differentiable all-reduces, so it also runs under gloo on CPU: the mean and variance of a channel
are taken over the union of all processes' batches, exactly as one process holding the whole batch
would compute them (up to floating-point summation order).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient of every rank's input is the sum of all ranks' gradients."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        out = grad.clone()
        dist.all_reduce(out)
        return out


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Differentiable sum of ``x`` over all processes."""
    return _AllReduceSum.apply(x)


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm (any of 1d/2d/3d input) whose training statistics span all processes."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"GlobalBatchNorm expects at least 2-D input, got {input.dim()}-D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not self.training or not (dist.is_available() and dist.is_initialized()):
            return super().forward(input)

        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        x = input.float()
        local_count = x.new_tensor([x.numel() / x.shape[1]])
        totals = all_reduce_sum(torch.cat([x.sum(dims), local_count]))
        count = totals[-1]
        mean = totals[:-1] / count
        centred = x - mean.reshape(shape)
        var = all_reduce_sum(centred.square().sum(dims)) / count
        out = centred * torch.rsqrt(var + self.eps).reshape(shape)
        if self.affine:
            out = out * self.weight.reshape(shape) + self.bias.reshape(shape)

        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = (
                    1.0 / float(self.num_batches_tracked)
                    if self.momentum is None
                    else self.momentum
                )
                unbiased = var * (count / (count - 1).clamp(min=1))
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        return out.to(input.dtype)


def convert_to_global_bn(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm layer in ``module`` by :class:`GlobalBatchNorm` (same state)."""
    if isinstance(module, _BatchNorm) and not isinstance(module, GlobalBatchNorm):
        replacement = GlobalBatchNorm(
            module.num_features,
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
        )
        # Keep the very same Parameter and buffer objects so optimiser groups stay valid.
        if module.affine:
            replacement.weight, replacement.bias = module.weight, module.bias
        if module.track_running_stats:
            replacement.running_mean = module.running_mean
            replacement.running_var = module.running_var
            replacement.num_batches_tracked = module.num_batches_tracked
        replacement.train(module.training)
        return replacement
    for name, child in module.named_children():
        module.add_module(name, convert_to_global_bn(child))
    return module


def convert_sync_bn(module: nn.Module, device: torch.device) -> nn.Module:
    """torch's fused SyncBatchNorm on CUDA, :class:`GlobalBatchNorm` elsewhere."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return convert_to_global_bn(module)
