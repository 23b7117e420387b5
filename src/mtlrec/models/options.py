"""Typed model options: the fields every model shares, inherited by each model's own class.

A model's options class lives beside the model (e.g. `PLEOptions` in ple.py) and extends
one of these; a config's `model:` block (less `name`) is validated into it, so a wrong type
or a value out of range is an error naming the option.

Example:
    >>> ExpertOptions(expert_hidden=[64], dropout=0.1).expert_hidden
    [64]
    >>> ExpertOptions(dropout=1.0)
    Traceback (most recent call last):
    ...
    pydantic_core._pydantic_core.ValidationError: 1 validation error for ExpertOptions
    dropout
      Input should be less than 1 ...
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from mtlrec.nn.mlp import ACTIVATIONS
from mtlrec.schema import NamedBlock

Activation = Literal[tuple(ACTIVATIONS)]  # type: ignore[valid-type]


class SequenceEncoderOptions(NamedBlock):
    """How a model reads the lists kept as sequences (`pooling: none`): the Behavior Sequence
    Transformer (`mtlrec.nn.sequence`), one per such list, its output appended to the model's
    input x. A bare name stands for the defaults (`sequence_encoder: transformer`).

    Example:
        >>> SequenceEncoderOptions.model_validate("transformer").output
        'concat'
        >>> SequenceEncoderOptions(heads=2, layers=1, output="target").heads
        2
    """

    name: Literal["transformer"] = Field("transformer", description="the encoder (BST, Chen et al. 2019)")
    heads: PositiveInt = Field(8, description="attention heads, each of the token's full width (the paper: 8)")
    layers: PositiveInt = Field(1, description="self-attention blocks stacked (the paper: 1 did best)")
    ffn_hidden: PositiveInt | None = Field(
        None, description="width of the point-wise feed-forward layer; null: 4 x the token width")
    position_dim: PositiveInt | None = Field(
        None, description="size of the recency embedding concatenated to each element; null: the list's embedding_dim")
    dropout: float = Field(0.2, ge=0.0, lt=1.0, description="after attention and after the feed-forward layer "
                                                           "(the paper: 0.2)")
    output: Literal["concat", "mean", "target"] = Field(
        "concat", description="concat: every position's vector side by side, padding zeroed (as the paper's Figure 1 draws it); mean: the "
                              "mean over the real positions; target: the target's position alone (needs "
                              "sequence_target on every pooling: none feature)")


class ModelOptions(BaseModel):
    """What every model takes: its towers (one MLP per task, ending in one logit) and the
    activation, dropout and batch norm of its hidden layers; and, with lists kept as
    sequences (`pooling: none`), the encoder that reads them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tower_hidden: list[PositiveInt] = Field([64], description="hidden layer sizes of each task's tower")
    tower_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    activation: Activation = "relu"
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="after each hidden layer of the backbone")
    batch_norm: bool = Field(False, description="batch norm after each hidden layer of the backbone")
    sequence_encoder: SequenceEncoderOptions | None = Field(
        None, description="reads the lists with pooling: none (mtlrec.nn.sequence); null: the schema has none")


class MLPOptions(ModelOptions):
    """Models built from plain MLPs (shared bottom, per-task bottoms, columns)."""

    hidden: list[PositiveInt] = Field([256, 128], description="layer sizes of the MLP")


class ExpertOptions(ModelOptions):
    """Mixture-of-experts models: experts of one shape, softmax gates."""

    expert_hidden: list[PositiveInt] = Field([256, 128], description="layer sizes of each expert MLP")
    gate_hidden: list[PositiveInt] = Field([], description="hidden layers of each gate (empty: linear gate)")
