"""Towers: shapes, gates, equivalences and wiring that would break if a tower were wired wrong."""

import pytest
import torch

from engagerec.towers import CGC, PLE, TOWERS, CrossStitch, MMoE, SingleTask, build_tower

SMALL = {
    "single_task": {"layer_sizes": [16, 8]},
    "shared_bottom": {"layer_sizes": [16, 8]},
    "cross_stitch": {"layer_sizes": [16, 8], "alpha_init": "near_identity"},
    "mmoe": {"num_experts": 3, "expert_sizes": [8]},
    "cgc": {"num_shared": 2, "num_specific": 1, "expert_sizes": [8]},
    "ple": {"num_levels": 2, "num_shared": 2, "num_specific": 1, "expert_sizes": [16, 8]},
}


def test_every_built_in_tower_is_registered():
    assert set(SMALL) <= set(TOWERS)


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("num_tasks", [1, 2, 3])
def test_one_representation_per_task_with_the_declared_width(name, num_tasks):
    tower = build_tower(name, 12, num_tasks, **SMALL[name])
    reps = tower(torch.randn(5, 12))
    assert len(reps) == num_tasks == len(tower.output_dims)
    assert [tuple(r.shape) for r in reps] == [(5, d) for d in tower.output_dims]


@pytest.mark.parametrize("name", ["mmoe", "cgc", "ple"])
def test_gate_weights_are_a_distribution_per_sample(name):
    tower = build_tower(name, 12, 3, **SMALL[name])
    tower(torch.randn(7, 12))
    assert tower.gate_weights
    for key, weights in tower.gate_weights.items():
        assert weights.shape[0] == 7 and (weights >= 0).all(), key
        assert torch.allclose(weights.sum(dim=1), torch.ones(7)), key


def test_gate_weights_differ_per_task():
    tower = MMoE(12, 2, num_experts=4)
    tower(torch.randn(7, 12))
    assert not torch.allclose(tower.gate_weights["task0"], tower.gate_weights["task1"])


def test_mmoe_mixes_every_task_as_study_eq_4_writes_it():
    """The batched mixture (one bmm for all tasks) is f_k(x) = sum_i g_k(x)_i f_i(x) per task,
    with g_k = softmax(W_k x + b_k) and f_i expert i's MLP, computed here one expert at a time;
    gradients reach every expert and gate weight."""
    torch.manual_seed(0)
    tower = MMoE(12, 3, num_experts=4, expert_sizes=[8])
    x = torch.randn(6, 12)
    outputs = tower(x)
    experts = tower.experts
    per_expert = [torch.relu(x @ experts.weights[0][i] + experts.biases[0][i]) for i in range(4)]
    logits = tower.gates.linear(x)
    for task in range(3):
        gate = torch.softmax(logits[:, task * 4 : (task + 1) * 4], dim=-1)
        expected = sum(gate[:, i : i + 1] * per_expert[i] for i in range(4))
        assert torch.allclose(outputs[task], expected, atol=1e-6)
        torch.testing.assert_close(tower.gate_weights[f"task{task}"], gate.detach(), rtol=1e-6, atol=1e-7)
    sum(o.sum() * (k + 1) for k, o in enumerate(outputs)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tower.parameters())


def test_stacked_gates_equal_the_per_gate_softmaxes_and_need_equal_sizes():
    from engagerec.towers.common import GateBank

    bank, x = GateBank(12, [3, 3, 3]), torch.randn(5, 12)
    stacked, listed = bank.stacked(x), bank(x)
    assert all(torch.allclose(stacked[:, k], listed[k]) for k in range(3))
    with pytest.raises(ValueError, match="same number of experts"):
        GateBank(12, [3, 5]).stacked(x)


def test_ple_gate_layout():
    tower = PLE(12, 2, num_levels=2, num_shared=2, num_specific=3, expert_sizes=[8])
    tower(torch.randn(4, 12))
    assert tower.gate_weights["level0/task0"].shape == (4, 3 + 2)  # own + shared experts
    assert tower.gate_weights["level0/shared"].shape == (4, 2 * 3 + 2)  # every expert
    assert "level1/shared" not in tower.gate_weights  # no shared gate at the last level


def test_cross_stitch_with_identity_alpha_equals_independent_columns():
    torch.manual_seed(0)
    stitched = CrossStitch(12, 3, layer_sizes=[16, 8], alpha_init="identity", train_alpha=False)
    columns = SingleTask(12, 3, layer_sizes=[16, 8])
    for t in range(3):
        for depth in range(2):
            columns.columns[t][2 * depth].load_state_dict(stitched.layers[depth][t][0].state_dict())
    x = torch.randn(9, 12)
    for a, b in zip(stitched(x), columns(x), strict=True):
        torch.testing.assert_close(a, b)
    # and a non-identity alpha really mixes the columns
    stitched.alphas[0].data = torch.full((3, 3), 1 / 3)
    assert not torch.allclose(stitched(x)[0], columns(x)[0])


def test_cross_stitch_alpha_initialisations():
    assert torch.equal(CrossStitch(4, 2, layer_sizes=[4]).alphas[0], torch.zeros(2, 2))  # the study's
    near = CrossStitch(4, 3, layer_sizes=[4], alpha_init="near_identity", self_weight=0.8).alphas[0]
    torch.testing.assert_close(near.sum(dim=1), torch.ones(3))
    assert near[0, 0].item() == pytest.approx(0.8) and near[0, 1].item() == pytest.approx(0.1)


def test_ple_with_one_level_equals_cgc():
    torch.manual_seed(0)
    cgc = CGC(12, 2, num_shared=2, num_specific=2, expert_sizes=[8])
    ple = PLE(12, 2, num_levels=1, num_shared=2, num_specific=2, expert_sizes=[8])
    ple.load_state_dict(cgc.state_dict())
    x = torch.randn(6, 12)
    for a, b in zip(cgc(x), ple(x), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_gradients_reach_every_parameter(name):
    tower = build_tower(name, 12, 2, **SMALL[name])
    reps = tower(torch.randn(32, 12))
    sum(r.pow(2).mean() for r in reps).backward()
    for param_name, param in tower.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, param_name


def test_zero_initialised_cross_stitch_wakes_up_one_layer_per_step():
    """With the study's alpha = 0, a layer's columns get no gradient until every alpha above
    them has moved: step s reaches depth L - s + 1. Slow to start, but not dead."""
    torch.manual_seed(0)
    tower = CrossStitch(12, 2, layer_sizes=[16, 8])
    optimizer = torch.optim.SGD(tower.parameters(), lr=0.1)
    x, y = torch.randn(64, 12), torch.randn(64, 8)
    first_layer_grad = []
    for _ in range(3):
        optimizer.zero_grad()
        sum((r - y).pow(2).mean() for r in tower(x)).backward()
        first_layer_grad.append(tower.layers[0][0][0].weight.grad.abs().sum().item())
        optimizer.step()
    assert first_layer_grad[0] == 0 and first_layer_grad[1] == 0 and first_layer_grad[2] > 0


def test_unknown_tower_suggests_the_nearest_name():
    with pytest.raises(KeyError, match="did you mean 'mmoe'"):
        build_tower("mmeo", 4, 2)


def test_expert_group_equals_separate_expert_mlps():
    from engagerec.towers.common import ExpertGroup, mlp

    torch.manual_seed(0)
    group = ExpertGroup(12, 3, [16, 8])
    x = torch.randn(5, 12)
    out = group(x)
    assert out.shape == (5, 3, 8)
    for e in range(3):
        expert = mlp(12, [16, 8])
        expert[0].weight.data = group.weights[0][e].T.clone()
        expert[0].bias.data = group.biases[0][e, 0].clone()
        expert[2].weight.data = group.weights[1][e].T.clone()
        expert[2].bias.data = group.biases[1][e, 0].clone()
        torch.testing.assert_close(out[:, e], expert(x))


@pytest.mark.parametrize("name", sorted(SMALL))
def test_every_tower_fx_traces_through_as_well_as_as_a_leaf(name):
    """Pipelines trace a tower as a leaf when the model holds sharded modules and through it
    when it holds none (dense-only data): both must work."""
    tower = build_tower(name, 12, 2, **SMALL[name])
    traced = torch.fx.symbolic_trace(tower)
    x = torch.randn(4, 12)
    for a, b in zip(traced(x), tower(x), strict=True):
        torch.testing.assert_close(a, b)
