"""The expert bank's training step against plain per-expert modules.

Every path of `ExpertBank` (the fused Linear -> BatchNorm -> ReLU function, the layer-by-layer
path other activations take, the path tracers and compilers record) gives the outputs,
gradients and batch norm statistics of E separate nn.Linear / nn.BatchNorm1d / activation
stacks with the bank's weights copied in, run one by one.
"""

import pytest
import torch
from torch import nn

from mtlrec.nn import ExpertBank
from mtlrec.nn.experts import ExpertMatmul, FusedExperts, LayerPlan, runs_of

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is the fastest

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


def plain_experts(bank: ExpertBank, activation: str = "relu") -> list[nn.Sequential]:
    """One nn.Sequential per expert holding a copy of its weights, biases and batch norm
    units (parameters, running statistics, momentum, eps), as separate modules would."""
    experts = []
    for e in range(bank.num_experts):
        layers = []
        for layer, (w, b) in enumerate(bank.expert_layers(e)):
            linear = nn.Linear(w.shape[0], w.shape[1])
            with torch.no_grad():
                linear.weight.copy_(w.t())
                linear.bias.copy_(b)
            layers.append(linear)
            norm = bank.norms[layer]
            if isinstance(norm, nn.BatchNorm1d):
                h = w.shape[1]
                units = slice(e * h, (e + 1) * h)
                own = nn.BatchNorm1d(h, eps=norm.eps, momentum=norm.momentum)
                with torch.no_grad():
                    for name in ("weight", "bias", "running_mean", "running_var"):
                        getattr(own, name).copy_(getattr(norm, name)[units])
                own.num_batches_tracked.copy_(norm.num_batches_tracked)
                layers.append(own)
            if bank.active[layer]:
                layers.append(ACTIVATIONS[activation]())
        experts.append(nn.Sequential(*layers).train(bank.training))
    return experts


def run_plain(experts: list[nn.Sequential], inputs: torch.Tensor, groups: list[int]) -> torch.Tensor:
    """`[B, E, H]`: expert e on input group groups[e] of `[G, B, I]`, one at a time."""
    return torch.stack([expert(inputs[g]) for expert, g in zip(experts, groups)], dim=1)


def assert_grads_match(bank: ExpertBank, experts: list[nn.Sequential], atol: float = 1e-5) -> None:
    """Each expert's slice of the bank's gradients equals its plain module's."""
    for e, expert in enumerate(experts):
        linears = [m for m in expert if isinstance(m, nn.Linear)]
        norms = [m for m in expert if isinstance(m, nn.BatchNorm1d)]
        for layer, linear in enumerate(linears):
            torch.testing.assert_close(bank.weights[layer].grad[e], linear.weight.grad.t(), atol=atol, rtol=1e-4)
            # before batch norm a bias's gradient is 0 up to rounding, which scales with the weights'
            scale = max(1.0, linear.weight.grad.abs().max().item())
            torch.testing.assert_close(bank.biases[layer].grad[e], linear.bias.grad, atol=atol * scale, rtol=1e-4)
        for norm, own in zip([n for n in bank.norms if isinstance(n, nn.BatchNorm1d)], norms):
            units = slice(e * own.num_features, (e + 1) * own.num_features)
            torch.testing.assert_close(norm.weight.grad[units], own.weight.grad, atol=atol, rtol=1e-4)
            torch.testing.assert_close(norm.bias.grad[units], own.bias.grad, atol=atol, rtol=1e-4)


def assert_statistics_match(bank: ExpertBank, experts: list[nn.Sequential]) -> None:
    for e, expert in enumerate(experts):
        own_norms = [m for m in expert if isinstance(m, nn.BatchNorm1d)]
        for norm, own in zip([n for n in bank.norms if isinstance(n, nn.BatchNorm1d)], own_norms):
            units = slice(e * own.num_features, (e + 1) * own.num_features)
            torch.testing.assert_close(norm.running_mean[units], own.running_mean, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(norm.running_var[units], own.running_var, atol=1e-5, rtol=1e-5)
            assert int(norm.num_batches_tracked) == int(own.num_batches_tracked)


def make_bank(groups, batch_norm=True, activation="relu", activate_last=True, momentum=0.1, seed=0):
    torch.manual_seed(seed)
    num_experts = len(groups) if groups else 4
    bank = ExpertBank(5, num_experts, [7, 3], activation=activation, batch_norm=batch_norm, groups=groups,
                      activate_last=activate_last)
    with torch.no_grad():  # batch norm away from its identity start, so that a mistake shows
        for norm in bank.norms:
            if isinstance(norm, nn.BatchNorm1d):
                norm.momentum = momentum
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.uniform_(-0.5, 0.5)
                norm.running_mean.uniform_(-1, 1)
                norm.running_var.uniform_(0.5, 2)
        for b in bank.biases:
            b.uniform_(-2, 2)  # a bias large against the products: the running mean must carry it
    return bank


def inputs_for(groups, rows=16, seed=1):
    torch.manual_seed(seed)
    n_groups = 1 if groups is None else max(groups) + 1
    return torch.randn(n_groups, rows, 5, requires_grad=True)


def autograd_nodes(out: torch.Tensor) -> set[str]:
    """The names of the autograd nodes `out` was computed through: which path ran."""
    seen, todo = set(), [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and type(node).__name__ not in seen:
            seen.add(type(node).__name__)
            todo += [next_node for next_node, _ in node.next_functions]
    return seen


def step_both(bank, experts, groups, x, steps=1):
    """Forward and backward passes of the bank and of the plain modules on the same input and
    loss (the outputs against a fixed random tensor); the outputs of the last pass and the
    input's gradients."""
    probe = torch.randn(x.shape[1], bank.num_experts, bank.out_dim)
    grads = []
    for _ in range(steps):
        bank.zero_grad()
        for expert in experts:
            expert.zero_grad()
        x.grad = None
        got = bank(x[0] if groups is None else x)
        (got * probe).sum().backward()
        grads.append(x.grad.clone())
        x.grad = None
        expected = run_plain(experts, x, groups or [0] * bank.num_experts)
        (expected * probe).sum().backward()
        grads.append(x.grad.clone())
    return got, expected, grads[-2], grads[-1]


@pytest.mark.parametrize("groups", [None, [0, 0, 1, 1, 2, 2], [1, 0, 1]])
@pytest.mark.parametrize("batch_norm", [True, False])
@pytest.mark.parametrize("activate_last", [True, False])
def test_fused_training_step_equals_plain_experts(groups, batch_norm, activate_last):
    bank = make_bank(groups, batch_norm, activate_last=activate_last).train()
    experts = plain_experts(bank)
    x = inputs_for(groups)
    got, expected, grad_x, expected_grad_x = step_both(bank, experts, groups, x, steps=2)
    assert "FusedExpertsBackward" in autograd_nodes(got)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grad_x, expected_grad_x, atol=1e-5, rtol=1e-4)
    assert_grads_match(bank, experts)
    assert_statistics_match(bank, experts)


@pytest.mark.parametrize("groups", [None, [0, 1, 1]])
def test_cumulative_batch_norm_statistics_equal_plain_experts(groups):
    """momentum None: the running statistics are the average over the steps so far."""
    bank = make_bank(groups, momentum=None).train()
    experts = plain_experts(bank)
    step_both(bank, experts, groups, inputs_for(groups), steps=3)
    assert_statistics_match(bank, experts)


@pytest.mark.parametrize("activation", ["tanh", "gelu"])
@pytest.mark.parametrize("groups", [None, [0, 1, 1]])
def test_layer_by_layer_step_equals_plain_experts(activation, groups):
    """Activations other than ReLU run layer by layer (`ExpertMatmul`, then the modules)."""
    bank = make_bank(groups, activation=activation).train()
    experts = plain_experts(bank, activation)
    x = inputs_for(groups)
    got, expected, grad_x, expected_grad_x = step_both(bank, experts, groups, x, steps=2)
    assert "ExpertMatmulBackward" in autograd_nodes(got) and "FusedExpertsBackward" not in autograd_nodes(got)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grad_x, expected_grad_x, atol=1e-5, rtol=1e-4)
    assert_grads_match(bank, experts)
    assert_statistics_match(bank, experts)


@pytest.mark.parametrize("groups", [None, [0, 0, 1, 1, 2, 2]])
@pytest.mark.parametrize("batch_norm", [True, False])
def test_evaluation_equals_plain_experts(groups, batch_norm):
    """Evaluation: batch norm folded into the weights; outputs and gradients (grad enabled)."""
    bank = make_bank(groups, batch_norm).eval()
    experts = plain_experts(bank)
    x = inputs_for(groups, rows=5)
    got, expected, grad_x, expected_grad_x = step_both(bank, experts, groups, x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grad_x, expected_grad_x, atol=1e-5, rtol=1e-4)
    assert_grads_match(bank, experts)


@pytest.mark.parametrize("groups", [None, [0, 0, 1, 1, 2, 2]])
@pytest.mark.parametrize("train", [True, False])
def test_traced_path_equals_the_fused_path(groups, train):
    """What a tracer records (ONNX export, TorchScript) computes the same outputs."""
    bank = make_bank(groups).train(train)
    x = inputs_for(groups).detach()
    x = x[0] if groups is None else x
    with torch.no_grad():
        traced = torch.jit.trace(bank, (x,), check_trace=False)
        torch.testing.assert_close(traced(x), bank(x), atol=1e-5, rtol=1e-5)


def test_dropout_runs_layer_by_layer_as_the_traced_path_does():
    """Dropout in training leaves the fused function; the layer-by-layer path draws the same
    masks as the plain operators a tracer records, and gives the same gradients."""
    torch.manual_seed(0)
    bank = ExpertBank(5, 3, [7, 3], dropout=0.3, batch_norm=True).train()
    x = torch.randn(16, 5)
    traced = torch.jit.trace(bank, (x,), check_trace=False)
    results = []
    for forward in (bank, traced):
        bank.zero_grad()
        torch.manual_seed(5)
        out = forward(x)
        assert ("ExpertMatmulBackward" in autograd_nodes(out)) == (forward is bank)  # the trace: plain operators
        out.square().sum().backward()
        results.append((out, [p.grad.clone() for p in bank.parameters()]))
    (got, got_grads), (expected, expected_grads) = results
    assert (got == 0).float().mean() > 0.1  # dropout did drop
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for a, b in zip(got_grads, expected_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_backward_twice_through_a_retained_graph():
    """The backward pass works in place on its own buffers only: a second pass over the same
    graph (gradient methods retain it) gives the same gradients."""
    bank = make_bank([0, 1, 1]).train()
    x = inputs_for([0, 1, 1])
    out = bank(x).square().sum()
    first = torch.autograd.grad(out, [x, *bank.parameters()], retain_graph=True)
    second = torch.autograd.grad(out, [x, *bank.parameters()])
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_non_contiguous_input_and_unread_groups():
    """PLE's upper levels pass a transposed view; a group no expert reads gets gradient 0."""
    bank = make_bank([0, 0, 2]).train()  # group 1 is read by no expert
    experts = plain_experts(bank)
    torch.manual_seed(3)
    stacked = torch.randn(16, 3, 5, requires_grad=True)
    view = stacked.transpose(0, 1)  # [3, B, 5], not contiguous
    probe = torch.randn(16, 3, 3)
    (bank(view) * probe).sum().backward()
    got = stacked.grad.clone()
    stacked.grad = None
    (run_plain(experts, stacked.transpose(0, 1), [0, 0, 2]) * probe).sum().backward()
    torch.testing.assert_close(got, stacked.grad, atol=1e-5, rtol=1e-4)
    assert got[:, 1].abs().max() == 0


def test_input_without_gradient():
    bank = make_bank(None).train()
    experts = plain_experts(bank)
    x = torch.randn(16, 5)
    bank(x).sum().backward()
    run_plain(experts, x.unsqueeze(0), [0] * 4).sum().backward()
    assert_grads_match(bank, experts)


@pytest.mark.parametrize("runs", [None, runs_of([0, 0, 1])])
def test_expert_matmul_gradient_against_finite_differences(runs):
    torch.manual_seed(0)
    weight = torch.randn(3, 4, 2, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    x = torch.randn(*((6, 3 * 4) if runs is None else (2, 6, 4)), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: ExpertMatmul.apply(*a, runs), (x, weight, bias))


def test_fused_experts_gradient_against_finite_differences():
    torch.manual_seed(0)
    params = []
    for fan_in, fan_out in ((4, 5), (5, 2)):
        params += [torch.randn(3, fan_in, fan_out, dtype=torch.float64, requires_grad=True),
                   torch.randn(3, fan_out, dtype=torch.float64, requires_grad=True),
                   torch.rand(3 * fan_out, dtype=torch.float64, requires_grad=True) + 0.5,
                   torch.randn(3 * fan_out, dtype=torch.float64, requires_grad=True)]
    params = [p.detach().requires_grad_() for p in params]
    plans = (LayerPlan(True, True), LayerPlan(True, True))  # no running statistics: nothing updated
    x = torch.randn(2, 8, 4, dtype=torch.float64, requires_grad=True)
    runs = runs_of([0, 1, 1])
    assert torch.autograd.gradcheck(lambda x, *p: FusedExperts.apply(x, runs, plans, *p), (x, *params))


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_batch_norm_refuses_one_row_in_training(activation):
    """One row has no batch statistics: both paths say so, as nn.BatchNorm1d does."""
    bank = ExpertBank(5, 3, [4], activation=activation, batch_norm=True).train()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bank(torch.randn(1, 5))
    assert bank.eval()(torch.randn(1, 5)).shape == (1, 3, 4)  # folded in evaluation: one row is fine


def test_parameter_layout_is_the_saved_models():
    """Saved models load: the bank's state dict keeps its names and shapes."""
    bank = ExpertBank(5, 3, [7, 2], batch_norm=True)
    shapes = {k: tuple(v.shape) for k, v in bank.state_dict().items()}
    assert shapes == {
        "weights.0": (3, 5, 7), "weights.1": (3, 7, 2), "biases.0": (3, 7), "biases.1": (3, 2),
        "norms.0.weight": (21,), "norms.0.bias": (21,), "norms.0.running_mean": (21,), "norms.0.running_var": (21,),
        "norms.0.num_batches_tracked": (),
        "norms.1.weight": (6,), "norms.1.bias": (6,), "norms.1.running_mean": (6,), "norms.1.running_var": (6,),
        "norms.1.num_batches_tracked": (),
    }
