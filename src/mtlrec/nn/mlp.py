"""A plain multi-layer perceptron."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

ACTIVATIONS = {"relu": lambda: nn.ReLU(inplace=True), "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh,
               "sigmoid": nn.Sigmoid, "prelu": nn.PReLU}


def activation_layer(name: str) -> nn.Module:
    """The activation `name`; ReLU works in place (it always follows a Linear, a batched
    product or a batch norm, none of which keeps its output for the backward pass)."""
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; allowed: {sorted(ACTIVATIONS)}") from None


class MLP(nn.Sequential):
    """Linear -> [BatchNorm] -> activation -> [Dropout] for each hidden size.

    `output_dim`, when given, adds a last Linear without activation.
    Input `[..., in_dim]`, output `[..., hidden[-1]]` (or `[..., output_dim]`; `in_dim` if empty).
    """

    def __init__(
        self,
        in_dim: int,
        hidden: Sequence[int] = (),
        output_dim: int | None = None,
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
    ):
        layers: list[nn.Module] = []
        width = in_dim
        for size in hidden:
            layers.append(nn.Linear(width, size))
            if batch_norm:
                layers.append(nn.BatchNorm1d(size))
            layers.append(activation_layer(activation))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = size
        if output_dim is not None:
            layers.append(nn.Linear(width, output_dim))
            width = output_dim
        super().__init__(*layers)
        self.out_dim = width

    def forward(self, x: Tensor) -> Tensor:
        if len(self) == 0:
            return x
        return super().forward(x)
