"""Building blocks shared by the towers: MLPs, batched experts, softmax gates and their mixture.

Every block takes ``device`` and creates its parameters there, so a tower can be built on
``torch.device("meta")`` (shapes only, no memory, no initialisation) as TorchRec's own
modules can.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


def mlp(
    input_dim: int,
    layer_sizes: Sequence[int],
    activation: str = "relu",
    dropout: float = 0.0,
    device: Optional[torch.device] = None,
) -> nn.Sequential:
    """
    A multi-layer perceptron: ``Linear -> activation (-> Dropout)`` for each entry of
    ``layer_sizes``, the activation applied after the last layer too. An empty
    ``layer_sizes`` gives an empty ``nn.Sequential``, the identity. The columns of
    SingleTask, SharedBottom and CrossStitch and the hidden part of a task head are these.

    Args:
        input_dim (int): number of elements in each input sample.
        layer_sizes (Sequence[int]): ``out_features`` of each Linear, bottom to top.
        activation (str): the nonlinearity after every Linear, one of ``"relu"``, ``"gelu"``,
            ``"silu"``, ``"tanh"``. Default: ``"relu"``.
        dropout (float): dropout probability after every activation; 0 adds no Dropout
            layer. Default: 0.0.
        device (Optional[torch.device]): where the parameters are created. Default: None
            (torch's default device).

    Returns:
        nn.Sequential: maps [B, input_dim] to [B, ``out_dim(input_dim, layer_sizes)``].

    Raises:
        ValueError: if ``activation`` is not one of the names above.

    Example::

        >>> import torch
        >>> from engagerec.towers.common import mlp
        >>> _ = torch.manual_seed(0)
        >>> net = mlp(12, [16, 8], activation="gelu", dropout=0.1)
        >>> [type(layer).__name__ for layer in net]
        ['Linear', 'GELU', 'Dropout', 'Linear', 'GELU', 'Dropout']
        >>> net(torch.randn(5, 12)).shape
        torch.Size([5, 8])
        >>> x = torch.randn(5, 12)
        >>> torch.equal(mlp(12, [])(x), x)
        True
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation '{activation}', expected one of {sorted(ACTIVATIONS)}")
    layers: List[nn.Module] = []
    width = input_dim
    for size in layer_sizes:
        layers += [nn.Linear(width, size, device=device), ACTIVATIONS[activation]()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = size
    return nn.Sequential(*layers)


def out_dim(input_dim: int, layer_sizes: Sequence[int]) -> int:
    """
    Width of what ``mlp(input_dim, layer_sizes)`` or an ExpertGroup with these sizes returns:
    the last layer size, or ``input_dim`` when there are no layers.

    Args:
        input_dim (int): number of elements in each input sample.
        layer_sizes (Sequence[int]): ``out_features`` of each layer.

    Returns:
        int: the output width.

    Example::

        >>> from engagerec.towers.common import out_dim
        >>> out_dim(12, [16, 8]), out_dim(12, [])
        (8, 12)
    """
    return layer_sizes[-1] if len(layer_sizes) else input_dim


class ExpertGroup(nn.Module):
    """
    ``num_experts`` MLP experts of one shape reading one input, computed together: the first
    layer of all experts is one wide matmul, each deeper layer one batched matmul, instead of
    a small matmul per expert. Expert i is the feed-forward f_i of study eq. 2 and 4 (MMoE)
    and h_{i,j} = f_{i,j}(x) of eq. 11 (PLE); the output stacks the experts as S_j(x) of
    eq. 7. Each expert is initialised as ``mlp(input_dim, layer_sizes)`` would be (nn.Linear's
    default). ``weights[l]`` holds layer l of every expert as [num_experts, fan_in, fan_out]
    (the transpose of nn.Linear's weight), ``biases[l]`` as [num_experts, 1, fan_out].

    Args:
        input_dim (int): number of elements in each input sample.
        num_experts (int): number of experts E.
        layer_sizes (Sequence[int]): ``out_features`` of each expert's layers, bottom to top;
            empty makes every expert the identity.
        activation (str): the nonlinearity after every layer, one of ``"relu"``, ``"gelu"``,
            ``"silu"``, ``"tanh"``. Default: ``"relu"``.
        dropout (float): dropout probability after every activation. Default: 0.0.
        device (Optional[torch.device]): where the parameters are created. Default: None.

    Call Args:
        x (torch.Tensor): [B, input_dim].

    Returns:
        torch.Tensor: [B, num_experts, output_dim], expert i's output at ``[:, i]``;
        ``output_dim = out_dim(input_dim, layer_sizes)``.

    Raises:
        ValueError: if ``activation`` is unknown.

    Example::

        >>> import torch
        >>> from engagerec.towers.common import ExpertGroup
        >>> _ = torch.manual_seed(0)
        >>> group = ExpertGroup(12, num_experts=3, layer_sizes=[16, 8])
        >>> group(torch.randn(5, 12)).shape
        torch.Size([5, 3, 8])
        >>> group.weights[0].shape, group.biases[1].shape
        (torch.Size([3, 12, 16]), torch.Size([3, 1, 8]))
        >>> ExpertGroup(12, 3, [16], device=torch.device("meta")).weights[0].device
        device(type='meta')
    """

    def __init__(
        self,
        input_dim: int,
        num_experts: int,
        layer_sizes: Sequence[int],
        activation: str = "relu",
        dropout: float = 0.0,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation '{activation}', expected one of {sorted(ACTIVATIONS)}")
        self.num_experts, self.input_dim = num_experts, input_dim
        widths = [input_dim, *layer_sizes]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(widths[:-1], widths[1:], strict=True):
            bound = 1.0 / fan_in**0.5  # nn.Linear's default initialisation
            self.weights.append(
                nn.Parameter(torch.empty(num_experts, fan_in, fan_out, device=device).uniform_(-bound, bound))
            )
            self.biases.append(
                nn.Parameter(torch.empty(num_experts, 1, fan_out, device=device).uniform_(-bound, bound))
            )
        self.activation = ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.output_dim = widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, input_dim] -> [B, num_experts, output_dim]."""
        if len(self.weights) == 0:
            return x.unsqueeze(1).expand(-1, self.num_experts, -1)
        batch = x.shape[0]
        first, bias = self.weights[0], self.biases[0]
        wide = first.permute(1, 0, 2).reshape(self.input_dim, -1)  # [D, E * H1]
        h = torch.addmm(bias.reshape(1, -1), x, wide).view(batch, self.num_experts, -1).transpose(0, 1)
        h = self.dropout(self.activation(h))  # [E, B, H1]
        for weight, bias in zip(list(self.weights)[1:], list(self.biases)[1:], strict=True):
            h = self.dropout(self.activation(torch.baddbmm(bias, h, weight)))
        return h.transpose(0, 1)  # [B, E, H]


def mix(weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """
    The gated sum of expert outputs, sum_i g_i f_i (study eq. 2, 4 and 9). Elementwise: for a
    handful of experts this beats a batch of one-row matmuls.

    Args:
        weights (torch.Tensor): [B, E] gate weights, one row per sample.
        experts (torch.Tensor): [B, E, H] expert outputs, as an ExpertGroup returns them.

    Returns:
        torch.Tensor: [B, H], sample b's experts weighted by ``weights[b]`` and summed.

    Example::

        >>> import torch
        >>> from engagerec.towers.common import mix
        >>> experts = torch.arange(12.0).view(1, 3, 4)  # one sample, 3 experts of width 4
        >>> mix(torch.tensor([[0.0, 1.0, 0.0]]), experts)  # picks expert 1
        tensor([[4., 5., 6., 7.]])
        >>> torch.allclose(mix(torch.full((1, 3), 1 / 3), experts), experts.mean(dim=1))
        True
    """
    return (weights.unsqueeze(-1) * experts).sum(dim=1)


class GateBank(nn.Module):
    """
    Several softmax gates that read the same input, computed as one Linear: one matmul
    forward and one backward through the wide input instead of one per gate. Gate k is
    g_k(x) = softmax(W_k x + b_k), study eq. 6 with a bias (as eq. 10 has one).

    Args:
        input_dim (int): number of elements in each input sample.
        gate_sizes (Sequence[int]): number of experts each gate weighs, one entry per gate.
        device (Optional[torch.device]): where the parameters are created. Default: None.

    Call Args:
        x (torch.Tensor): [B, input_dim].

    Returns:
        List[torch.Tensor]: one [B, gate_sizes[k]] tensor per gate, every row summing to 1.

    Example::

        >>> import torch
        >>> from engagerec.towers.common import GateBank
        >>> _ = torch.manual_seed(0)
        >>> gates = GateBank(12, [3, 5])(torch.randn(4, 12))
        >>> [tuple(g.shape) for g in gates]
        [(4, 3), (4, 5)]
        >>> all(torch.allclose(g.sum(dim=1), torch.ones(4)) for g in gates)
        True
    """

    def __init__(
        self, input_dim: int, gate_sizes: Sequence[int], device: Optional[torch.device] = None
    ) -> None:
        super().__init__()
        self.gate_sizes = list(gate_sizes)
        self.linear = nn.Linear(input_dim, sum(gate_sizes), device=device)

    def stacked(self, x: torch.Tensor) -> torch.Tensor:
        """
        Every gate at once, for a bank whose gates all weigh the same number of experts.

        Args:
            x (torch.Tensor): [B, input_dim].

        Returns:
            torch.Tensor: [B, num_gates, size], gate k at ``[:, k]`` (equal to ``forward``'s
            k-th tensor).

        Raises:
            ValueError: if the gates differ in size.

        Example::

            >>> import torch
            >>> from engagerec.towers.common import GateBank
            >>> bank = GateBank(12, [3, 3])
            >>> x = torch.randn(4, 12)
            >>> bank.stacked(x).shape
            torch.Size([4, 2, 3])
            >>> torch.allclose(bank.stacked(x)[:, 1], bank(x)[1])
            True
        """
        size = self.gate_sizes[0]
        if any(other != size for other in self.gate_sizes):
            raise ValueError(
                f"stacked gates must all weigh the same number of experts, got {self.gate_sizes}"
            )
        return torch.softmax(self.linear(x).view(-1, len(self.gate_sizes), size), dim=-1)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        """x [B, input_dim] -> one [B, size] softmax per gate."""
        logits = self.linear(x)
        gates, start = [], 0
        for size in self.gate_sizes:  # Python ints: FX-traceable, unlike iterating a split
            gates.append(torch.softmax(logits[:, start : start + size], dim=-1))
            start += size
        return gates


class GatedMixture(nn.Module):
    """
    One softmax gate and the mixture it makes: w = softmax(W g + b) over the experts, then
    sum_i w_i f_i. The gate reads its own input g, which need not be the experts' input: a
    PLE task gate above the first level reads that task's previous representation, w_{k,j}
    of study eq. 10 mixing d_{k,j} of eq. 9 (eq. 2-6 are the case g = x).

    Args:
        gate_input_dim (int): number of elements in each sample of the gate's input.
        num_experts (int): number of experts the gate weighs.
        device (Optional[torch.device]): where the parameters are created. Default: None.

    Call Args:
        gate_input (torch.Tensor): [B, gate_input_dim], what the gate reads.
        experts (torch.Tensor): [B, num_experts, H], the stacked expert outputs.

    Returns:
        Tuple[torch.Tensor, torch.Tensor]: the mixture [B, H] and the gate weights
        [B, num_experts] (rows summing to 1).

    Example::

        >>> import torch
        >>> from engagerec.towers.common import GatedMixture
        >>> _ = torch.manual_seed(0)
        >>> gate = GatedMixture(gate_input_dim=6, num_experts=3)
        >>> mixed, weights = gate(torch.randn(4, 6), torch.randn(4, 3, 8))
        >>> mixed.shape, weights.shape
        (torch.Size([4, 8]), torch.Size([4, 3]))
        >>> torch.allclose(weights.sum(dim=1), torch.ones(4))
        True
    """

    def __init__(self, gate_input_dim: int, num_experts: int, device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.gate = nn.Linear(gate_input_dim, num_experts, device=device)

    def forward(self, gate_input: torch.Tensor, experts: torch.Tensor) -> "tuple[torch.Tensor, torch.Tensor]":
        """experts: [B, E, H] -> (mixture [B, H], weights [B, E])."""
        weights = torch.softmax(self.gate(gate_input), dim=-1)
        return mix(weights, experts), weights
