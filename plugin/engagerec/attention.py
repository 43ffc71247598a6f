"""Target attention over the viewing history (DIN: Zhou et al., "Deep Interest Network for
Click-Through Rate Prediction", KDD 2018): an input arch between the embeddings and any tower."""

from __future__ import annotations

import difflib
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn


def not_embedded(unknown: Sequence[str], known: Sequence[str]) -> str:
    """
    The end of an error about feature names that are not pooled embeddings: which, the ones
    that are, and the nearest known name when one unknown name is close to it (a typo).

    Args:
        unknown (Sequence[str]): the names not found.
        known (Sequence[str]): the pooled features' names.

    Returns:
        str: ``"['x'] are not embedded (have [...])"``, with ``"; did you mean 'y'?"`` when apt.

    Example::

        >>> not_embedded(["user"], ["user_id", "content_id"])
        "['user'] are not embedded (have ['user_id', 'content_id']); did you mean 'user_id'?"
    """
    message = f"{list(unknown)} are not embedded (have {list(known)})"
    near = difflib.get_close_matches(unknown[0], list(known), n=1) if len(unknown) == 1 else []
    return message + (f"; did you mean '{near[0]}'?" if near else "")


def column_blocks(widths: Sequence[int], names: Sequence[str]) -> Dict[str, Tuple[int, int]]:
    """
    Where each pooled feature's columns lie in the input arches' input (the pooled embeddings,
    one block per feature, in order).

    Args:
        widths (Sequence[int]): each block's width, in order.
        names (Sequence[str]): each block's name.

    Returns:
        Dict[str, Tuple[int, int]]: name -> (first column, width).

    Example::

        >>> column_blocks([2, 3], ["user", "item"])
        {'user': (0, 2), 'item': (2, 3)}
    """
    blocks, start = {}, 0
    for name, width in zip(names, widths, strict=True):
        blocks[name] = (start, width)
        start += width
    return blocks


class TargetAttention(nn.Module):
    """
    The candidate item weighs each item of the user's history by a small MLP over
    ``[h_p, c, h_p - c, h_p * c]`` (DIN's activation unit), and the weighted sum
    ``sum_p w_p h_p`` replaces the history's columns in the tower's input. As in DIN the
    weights are not normalised (no softmax), so how much history a user has stays visible;
    empty positions (users with fewer views) are all-zero bags and weigh nothing.

    Args:
        widths (Sequence[int]): the width of each column block of the input, in order (one
            per pooled feature, ``FeatureSpec.feature_names`` order).
        names (Sequence[str]): the name of each block.
        candidate (str): the candidate's block (one id per row).
        history (Sequence[str]): the history positions' blocks (each 0 or 1 id), all as wide
            as the candidate's (one table).
        hidden_sizes (Sequence[int]): the attention MLP's hidden layers. Default: (32,).
        device (Optional[torch.device]): where the parameters are created. Default: None.

    Call Args:
        pooled (torch.Tensor): [B, sum(widths)], the pooled embeddings.

    Returns:
        torch.Tensor: [B, output_dim]: every block but the history's, in order, then the
        attended history [B, d].

    Raises:
        ValueError: an unknown block name, or history blocks of another width than the candidate's.

    Example::

        >>> import torch
        >>> from engagerec.attention import TargetAttention
        >>> _ = torch.manual_seed(0)
        >>> arch = TargetAttention([2, 2, 2, 2], ["user", "item", "h@0", "h@1"], "item", ["h@0", "h@1"])
        >>> arch.output_dim  # user and item (2 + 2), then the attended history (2)
        6
        >>> pooled = torch.randn(3, 8)
        >>> pooled[0, 6:] = 0.0  # row 0 has one earlier view: its second position is empty
        >>> out = arch(pooled)
        >>> out.shape, torch.equal(out[:, :4], pooled[:, :4])
        (torch.Size([3, 6]), True)
        >>> swapped = pooled[:, [0, 1, 2, 3, 6, 7, 4, 5]]  # history order does not matter
        >>> torch.allclose(arch(swapped), out)
        True
    """

    def __init__(
        self,
        widths: Sequence[int],
        names: Sequence[str],
        candidate: str,
        history: Sequence[str],
        hidden_sizes: Sequence[int] = (32,),
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        starts = column_blocks(widths, names)
        unknown = [n for n in [candidate, *history] if n not in starts]
        if unknown:
            raise ValueError(f"target attention: features {not_embedded(unknown, list(starts))}")
        dim = starts[candidate][1]
        if any(starts[n][1] != dim for n in history):
            raise ValueError(f"target attention: history positions must be {dim} wide, as '{candidate}'")

        def columns(blocks: List[str]) -> torch.Tensor:
            return torch.tensor(
                [c for b in blocks for c in range(starts[b][0], sum(starts[b]))], device=device
            )

        self.dim, self.length = dim, len(history)
        self.register_buffer("candidate_columns", columns([candidate]), persistent=False)
        self.register_buffer("history_columns", columns(list(history)), persistent=False)
        kept = [n for n in names if n not in set(history)]
        self.register_buffer("kept_columns", columns(kept), persistent=False)
        layers: List[nn.Module] = []
        width = 4 * dim
        for size in hidden_sizes:
            layers += [nn.Linear(width, size, device=device), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, 1, device=device))
        self.score = nn.Sequential(*layers)
        self.output_dim = len(self.kept_columns) + dim

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled [B, sum(widths)] -> [B, output_dim]: the other blocks, then the attended history."""
        history = pooled.index_select(1, self.history_columns).view(-1, self.length, self.dim)  # [B, L, d]
        candidate = pooled.index_select(1, self.candidate_columns).unsqueeze(1).expand_as(history)
        present = (history != 0).any(dim=2, keepdim=True).to(history.dtype)  # [B, L, 1]; empty bags are 0
        weights = self.score(torch.cat([history, candidate, history - candidate, history * candidate], 2))
        attended = (weights * present * history).sum(dim=1)  # [B, d]
        return torch.cat([pooled.index_select(1, self.kept_columns), attended], dim=1)
