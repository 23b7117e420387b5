"""Building blocks shared by every architecture: MLPs, feature embedding, fused expert banks, gates."""

from mtlrec.nn.embedding import FeatureEmbedding
from mtlrec.nn.experts import ExpertBank
from mtlrec.nn.gates import Gate
from mtlrec.nn.mlp import MLP, activation_layer

__all__ = ["MLP", "ExpertBank", "FeatureEmbedding", "Gate", "activation_layer"]
