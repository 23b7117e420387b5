"""CUDA graphs: a step recorded once and replayed for every batch of the same shape.

At batch 1024 a training step of PLE launches several hundred small kernels, and the GPU spends
most of the step waiting for the host to launch them. Recorded as a CUDA graph, the whole step
(gather of the batch from the resident data, forward, losses, backward, clipping, optimizer) is
one launch. A graph replays fixed memory: its inputs are copied into tensors it recorded, its
outputs are tensors it overwrites at the next replay, and it may contain no host
synchronisation (no `.item()`, no shape that depends on values). What keeps a run from being
recorded is listed by `capture_blockers`; `train.cuda_graph: on` refuses such a run naming
why, `auto` runs it eagerly and says why once.

`GraphedCall(fn)` runs `fn` eagerly for its first `warmup` calls of one input shape (on a side
stream, as CUDA asks before a capture: lazy initialisation such as the optimizer's state then
happens outside the graph), records it on the next call, and replays it from then on. Inputs of
any other shape (the last, partial batch of an epoch) run eagerly, so every row is trained on
and nothing is padded. The eager and the recorded calls run the same function, so they compute
the same thing; tests/test_cuda.py checks that the weights agree.

Example (runs anywhere: without CUDA a GraphedCall is the plain call):
    >>> import torch
    >>> double = GraphedCall(lambda x: (2 * x,), enabled=torch.cuda.is_available())
    >>> double(torch.ones(3))[0].tolist()
    [2.0, 2.0, 2.0]
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import Tensor

WARMUP_CALLS = 3  # eager calls before the capture (PyTorch's CUDA graph notes use 3 for a training step)


class GraphedCall:
    """`fn(*inputs) -> tuple[Tensor, ...]` as a CUDA graph for the first input shapes it
    sees `warmup` + 1 times; returns fresh copies of the outputs (the graph's own are
    overwritten by the next replay). `enabled=False`: always the plain call."""

    def __init__(self, fn: Callable[..., tuple[Tensor, ...]], enabled: bool = True, warmup: int = WARMUP_CALLS):
        self.fn = fn
        self.enabled = enabled
        self.warmup = warmup
        self.shapes: tuple[torch.Size, ...] | None = None  # the input shapes the graph is (to be) recorded for
        self.eager_calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: tuple[Tensor, ...] = ()
        self.outputs: tuple[Tensor, ...] = ()
        self.replays = 0  # calls served by the graph (for tests and logs)

    def __call__(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        shapes = tuple(x.shape for x in inputs)
        if not self.enabled or (self.shapes is not None and shapes != self.shapes):
            return self.fn(*inputs)
        self.shapes = shapes
        if self.eager_calls < self.warmup:
            self.eager_calls += 1
            return _on_side_stream(self.fn, inputs)
        if self.graph is None:
            self._record(inputs)
        else:
            for static, x in zip(self.inputs, inputs):
                static.copy_(x, non_blocking=True)
        self.graph.replay()
        self.replays += 1
        return tuple(y.clone() for y in self.outputs)

    def _record(self, inputs: tuple[Tensor, ...]) -> None:
        self.inputs = tuple(x.clone() for x in inputs)
        self.graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        with torch.cuda.graph(self.graph):  # recorded, not run: the replay that follows runs it
            self.outputs = tuple(self.fn(*self.inputs))


def _on_side_stream(fn: Callable[..., tuple[Tensor, ...]], inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = fn(*inputs)
    torch.cuda.current_stream().wait_stream(stream)
    return out


@contextmanager
def matmul_precision(tf32: bool):
    """fp32 matrix products (and cuDNN convolutions) in TF32 inside the block when `tf32`,
    in full fp32 otherwise; the settings before the block are restored after it."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = (matmul.fp32_precision, cudnn.fp32_precision)
    matmul.fp32_precision = cudnn.fp32_precision = "tf32" if tf32 else "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision, cudnn.fp32_precision = before


def capture_blockers(*, device: torch.device, world: int, fused_tables: bool, strategy: str, weighting: str,
                     weighting_capturable: bool, optimizers: list[str], lists: bool,
                     compile: bool, stepped: list[str]) -> list[str]:
    """Why a run's training step cannot be recorded as a CUDA graph (empty: it can)."""
    blockers = []
    if device.type != "cuda":
        blockers.append(f"the device is {device.type}, and CUDA graphs are a CUDA feature")
    if world > 1:
        blockers.append("data parallel training all-reduces between steps (torchrun): not recorded yet")
    if fused_tables:
        blockers.append("TorchRec's fused tables update inside fbgemm's kernels, outside the graph")
    if strategy != "joint":
        blockers.append("the alternating strategy picks a task per step on the host")
    if not weighting_capturable:
        blockers.append(f"train.weighting {weighting!r} decides on the host (only fixed, uncertainty, learnable and "
                        "decay keep every step on the device)")
    other = sorted(set(optimizers) - {"adam", "adamw"})
    if other:
        blockers.append(f"optimizer {', '.join(other)}: only adam and adamw step inside a graph (capturable=True)")
    if lists:
        blockers.append("multi-valued and sequence features have a length per batch (a graph needs fixed shapes)")
    if compile:
        blockers.append("train.compile: use one or the other")
    if stepped:
        blockers.append(f"{', '.join(stepped)} update their state on the host after each step")
    return blockers


__all__ = ["GraphedCall", "WARMUP_CALLS", "capture_blockers", "matmul_precision"]
