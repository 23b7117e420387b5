import pytest
import torch
from torch import nn

from mtlrec.data.features import Features
from mtlrec.nn import ExpertBank, FeatureEmbedding
from mtlrec.schema import Schema


def loop_bank(bank: ExpertBank, inputs, groups, activate_last=True, eval_norm=False):
    """One expert at a time: the plain computation the fused bank replaces. With `eval_norm`,
    each hidden layer's batch norm is applied from its running statistics."""
    outs = []
    for e in range(bank.num_experts):
        h = inputs[groups[e]]
        layers = bank.expert_layers(e)
        for i, (w, b) in enumerate(layers):
            h = h @ w + b
            if i < len(layers) - 1 or activate_last:
                if eval_norm:
                    n, units = bank.norms[i], slice(e * h.shape[1], (e + 1) * h.shape[1])
                    h = (h - n.running_mean[units]) / torch.sqrt(n.running_var[units] + n.eps)
                    h = h * n.weight[units] + n.bias[units]
                h = torch.relu(h)
        outs.append(h)
    return torch.stack(outs, dim=1)


@pytest.mark.parametrize("groups", [None, [0, 0, 1, 2, 2]])
@pytest.mark.parametrize("activate_last", [True, False])
def test_fused_bank_equals_per_expert_loop(groups, activate_last):
    torch.manual_seed(0)
    bank = ExpertBank(6, 5, [8, 3], groups=groups, activate_last=activate_last)
    n_groups = 1 if groups is None else 3
    inputs = torch.randn(n_groups, 11, 6)
    got = bank(inputs[0] if groups is None else inputs)
    expected = loop_bank(bank, inputs, groups or [0] * 5, activate_last)
    assert got.shape == (11, 5, 3)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("groups", [None, [0, 1, 1]])
def test_training_batch_norm_normalises_each_expert_unit(groups):
    torch.manual_seed(0)
    bank = ExpertBank(4, 3, [6, 5], batch_norm=True, activation="tanh", groups=groups).train()
    with torch.no_grad():
        for norm in bank.norms:
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    inputs = torch.randn(2, 32, 4)

    def normalise(h, layer, e):  # batch statistics of one expert's units
        n, units = bank.norms[layer], slice(e * h.shape[1], (e + 1) * h.shape[1])
        z = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + n.eps)
        return torch.tanh(z * n.weight[units] + n.bias[units])

    expected = []
    for e in range(3):
        h = inputs[(groups or [0] * 3)[e]]
        for layer, (w, b) in enumerate(bank.expert_layers(e)):
            h = normalise(h @ w + b, layer, e)
        expected.append(h)
    got = bank(inputs[0] if groups is None else inputs)
    torch.testing.assert_close(got, torch.stack(expected, 1), atol=1e-5, rtol=0)
    assert all(n.num_batches_tracked == 1 for n in bank.norms)


@pytest.mark.parametrize("groups", [None, [0, 1, 1]])
def test_evaluation_folds_batch_norm_into_the_layers(groups):
    torch.manual_seed(0)
    bank = ExpertBank(4, 3, [6, 5], batch_norm=True, groups=groups)
    with torch.no_grad():
        for norm in bank.norms:
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
            norm.running_mean.uniform_(-1, 1)
            norm.running_var.uniform_(0.2, 3)
    inputs = torch.randn(2, 9, 4)
    bank.eval()
    got = bank(inputs[0] if groups is None else inputs)
    torch.testing.assert_close(got, loop_bank(bank, inputs, groups or [0] * 3, eval_norm=True), atol=1e-5, rtol=1e-5)
    assert bank.weights[0].grad is None  # folding builds new tensors; the parameters are untouched


def test_in_place_relu_keeps_gradients_exact():
    torch.manual_seed(0)
    bank = ExpertBank(4, 3, [6, 5], batch_norm=True).train()
    x = torch.randn(16, 4)
    bank(x).square().sum().backward()
    got = [p.grad.clone() for p in bank.parameters()]
    bank.zero_grad()
    for act in bank.activations:
        act.inplace = False
    bank(x).square().sum().backward()
    for g, p in zip(got, bank.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-6, rtol=0)


def test_bank_rejects_too_few_input_groups():
    bank = ExpertBank(4, 2, [3], groups=[0, 2])
    with pytest.raises(ValueError, match="input groups"):
        bank(torch.randn(2, 5, 4))


def test_embedding_concatenates_lookups_grouped_by_size():
    schema = Schema(
        sparse=[{"name": "a", "vocab_size": 5, "embedding_dim": 4}, {"name": "b", "vocab_size": 3, "embedding_dim": 2},
                {"name": "c", "vocab_size": 7, "embedding_dim": 4}],
        dense=[{"name": "d"}],
        tasks=[{"name": "y"}],
    )
    emb = FeatureEmbedding(schema)
    assert emb.out_dim == 4 + 2 + 4 + 1 and len(emb.tables) == 2
    ids = torch.tensor([[4, 2, 6], [0, 0, 0]])
    dense = torch.tensor([[0.5], [-1.0]])
    small, large = emb.tables  # sizes 2 and 4
    expected = torch.cat([small.weight[ids[:, 1]], large.weight[ids[:, 0]], large.weight[5 + ids[:, 2]], dense], 1)
    torch.testing.assert_close(emb(Features(ids, dense)), expected)
    assert isinstance(small, nn.Embedding) and small.num_embeddings == 3 and large.num_embeddings == 12


def test_embedding_needs_vocab_sizes():
    schema = Schema(sparse=[{"name": "a"}], tasks=[{"name": "y"}])
    with pytest.raises(ValueError, match="vocab_size"):
        FeatureEmbedding(schema)
