"""Explicit dot products between pooled embeddings: an input arch in front of any tower.

An MLP fed the concatenation [u, v] learns a dot product <u, v> only approximately and slowly
(Rendle et al., "Neural Collaborative Filtering vs. Matrix Factorization Revisited", RecSys
2020), while a watch ratio is largely such products: how this user likes this video, this
genre. DLRM (Naumov et al., 2019) hands the top MLP the pairwise dot products of its
embeddings for that reason; this arch hands the tower the dot products of chosen pairs.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from engagerec.attention import column_blocks, not_embedded


def pair_products(
    pooled: torch.Tensor, left: torch.Tensor, right: torch.Tensor, pair_sums: torch.Tensor
) -> torch.Tensor:
    """
    The dot products of column pairs: one gather per side, one multiply, then a fixed 0/1 matrix
    sums each pair's columns (a matmul: deterministic on GPUs, unlike index_add).

    Args:
        pooled (torch.Tensor): [B, columns].
        left (torch.Tensor): the left column of each multiplied pair of columns.
        right (torch.Tensor): the right column, likewise.
        pair_sums (torch.Tensor): [len(left), pairs], 1 where a multiplied column belongs to a pair.

    Returns:
        torch.Tensor: [B, pairs].

    Example::

        >>> import torch
        >>> pooled = torch.tensor([[1.0, 2.0, 3.0, 4.0]])  # <(1, 2), (3, 4)>
        >>> pair_products(pooled, torch.tensor([0, 1]), torch.tensor([2, 3]), torch.ones(2, 1))
        tensor([[11.]])
    """
    products = pooled.index_select(1, left) * pooled.index_select(1, right)
    return products @ pair_sums.to(products.dtype)


class DotInteraction(nn.Module):
    """
    Appends the dot product of each chosen pair of pooled features to the tower's input: for
    the pairs ``(a, b)`` the output is ``[inner(pooled), <e_a, e_b>, ...]``, one column per pair,
    where ``inner`` is another input arch (e.g. ``TargetAttention``) or the identity. No
    parameters: the gradient of each product reaches both embeddings directly, as in matrix
    factorisation.

    Args:
        widths (Sequence[int]): the width of each column block of the pooled input, in order
            (one per pooled feature, ``FeatureSpec.feature_names`` order).
        names (Sequence[str]): the name of each block.
        pairs (Sequence[Tuple[str, str]]): the pairs of features whose dot products are
            appended; the two of a pair must be equally wide.
        inner (Optional[nn.Module]): an input arch whose output comes first (it must have
            ``output_dim``). Default: None (the pooled input as it is).
        device (Optional[torch.device]): where the column indices are created. Default: None.
        detached (Sequence[str]): features whose columns, and the products they are in, reach
            the output without passing its gradient back: their tables then learn from other
            paths alone, e.g. ``DotLogits`` (a table shared with a feature not detached still
            learns through that feature). Default: () (every column passes it).

    Call Args:
        pooled (torch.Tensor): [B, sum(widths)], the pooled embeddings.

    Returns:
        torch.Tensor: [B, output_dim]: ``inner(pooled)`` (or ``pooled``), then one dot product
        per pair, in ``pairs`` order.

    Raises:
        ValueError: a pair names an unknown feature, a feature twice, or two features of
            different widths; a pair is given twice (in either order); there are no pairs; or a
            detached feature is unknown or comes with an inner arch.

    Example::

        >>> import torch
        >>> from engagerec.interactions import DotInteraction
        >>> arch = DotInteraction([2, 2, 1], ["user", "item", "hour"], [("user", "item")])
        >>> arch.output_dim  # the 5 pooled columns, then one product
        6
        >>> pooled = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
        >>> arch(pooled)  # 1 * 3 + 2 * 4 = 11
        tensor([[ 1.,  2.,  3.,  4.,  5., 11.]])
    """

    def __init__(
        self,
        widths: Sequence[int],
        names: Sequence[str],
        pairs: Sequence[Tuple[str, str]],
        inner: Optional[nn.Module] = None,
        device: Optional[torch.device] = None,
        detached: Sequence[str] = (),
    ) -> None:
        super().__init__()
        if not pairs:
            raise ValueError("dot interaction: no pairs given")
        blocks = column_blocks(widths, names)
        unknown = [n for n in detached if n not in blocks]
        if unknown:
            raise ValueError(f"dot interaction: detached features {not_embedded(unknown, list(blocks))}")
        if detached and inner is not None:
            raise ValueError(
                "dot interaction: features cannot be detached after an inner arch, which mixes them"
            )
        left, right, pair_of_column, seen = [], [], [], set()
        for index, (a, b) in enumerate(pairs):
            unknown = [n for n in (a, b) if n not in blocks]
            if unknown:
                raise ValueError(f"dot interaction: features {not_embedded(unknown, list(blocks))}")
            if a == b:
                raise ValueError(f"dot interaction: the pair ({a}, {b}) names one feature twice")
            if frozenset((a, b)) in seen:  # <a, b> = <b, a>: a repeat adds the same column
                raise ValueError(f"dot interaction: the pair ({a}, {b}) is given twice")
            seen.add(frozenset((a, b)))
            if blocks[a][1] != blocks[b][1]:
                raise ValueError(
                    f"dot interaction: '{a}' is {blocks[a][1]} wide and '{b}' {blocks[b][1]}: a pair's "
                    "features must be equally wide (model.embeddings.dims)"
                )
            left += range(blocks[a][0], sum(blocks[a]))
            right += range(blocks[b][0], sum(blocks[b]))
            pair_of_column += [index] * blocks[a][1]
        self.pairs = [tuple(pair) for pair in pairs]
        self.blocks = blocks  # name -> (first column, width) of each pooled feature
        # every pair's columns side by side (pair_products)
        self.register_buffer("left_columns", torch.tensor(left, device=device), persistent=False)
        self.register_buffer("right_columns", torch.tensor(right, device=device), persistent=False)
        summing = torch.zeros(len(left), len(pairs), device=device)
        summing[torch.arange(len(left), device=device), torch.tensor(pair_of_column, device=device)] = 1.0
        self.register_buffer("pair_sums", summing, persistent=False)
        self.inner = inner
        self.output_dim = (inner.output_dim if inner is not None else sum(widths)) + len(pairs)
        # 1 where the output passes its gradient back: the columns of features not detached, and
        # the products of two such features
        self.detached = list(detached)
        passes = torch.ones(sum(widths), device=device)
        for name in detached:
            passes[blocks[name][0] : sum(blocks[name])] = 0.0
        pair_passes = [float(a not in detached and b not in detached) for a, b in pairs]
        self.register_buffer(
            "passes", torch.cat([passes, torch.tensor(pair_passes, device=device)]), persistent=False
        )

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled [B, sum(widths)] -> [B, output_dim]: inner(pooled) (or pooled), then the products."""
        dots = pair_products(pooled, self.left_columns, self.right_columns, self.pair_sums)
        first = self.inner(pooled) if self.inner is not None else pooled
        out = torch.cat([first, dots], dim=1)
        if not self.detached:
            return out
        # the same values; the gradient reaches only the columns that pass it
        return out * self.passes + out.detach() * (1.0 - self.passes)


class DotLogits(nn.Module):
    """
    Adds the dot products of a ``DotInteraction``'s pairs straight to chosen tasks' logits, each
    times a learned scale that starts at 1: the second-order term of a factorisation machine
    (Rendle, ICDM 2010) beside the deep part, as DeepFM (Guo et al., IJCAI 2017) places it.
    Through the tower, a product's gradient reaches the embeddings scaled by the tower's small
    weights on it and mixed with every task's; here it reaches them at full strength, as in
    matrix factorisation. With the interaction's ``detached`` features, those tables learn from
    these logits alone.

    ``first_order`` features add the machine's first-order term too: ``<w_t, e_f>`` per chosen
    task, a learned vector over the feature's pooled embedding, so each id's bias is held in its
    own row, along ``w_t``. A detached table learns a bias by no other path: the tower reads it
    without passing its gradient back, and a product with a user's factors is no per-video
    constant.

    Args:
        interaction (DotInteraction): the pairs, over the pooled columns it reads.
        num_tasks (int): the model's tasks.
        tasks (Sequence[int]): the tasks whose logits add the products; the others get 0.
        first_order (Sequence[str]): pooled features whose embeddings also add a learned linear
            term to the chosen tasks' logits. Default: () (none).

    Call Args:
        pooled (torch.Tensor): [B, sum(widths)], the pooled embeddings the interaction reads.

    Returns:
        torch.Tensor: [B, num_tasks], the amounts added to each task's head output before its
        transform (0 for a task not chosen).

    Raises:
        ValueError: no task, a task index out of range, or a first-order feature that is not
            one of the interaction's pooled features, or is given twice.

    Example::

        >>> import torch
        >>> from engagerec.interactions import DotInteraction, DotLogits
        >>> pairs = DotInteraction([2, 2, 1], ["user", "item", "hour"], [("user", "item")])
        >>> logits = DotLogits(pairs, num_tasks=2, tasks=[0])
        >>> logits(torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]]))  # 1 * 3 + 2 * 4 = 11, to task 0
        tensor([[11.,  0.]], grad_fn=<MmBackward0>)
        >>> biased = DotLogits(pairs, num_tasks=2, tasks=[0], first_order=["item"])
        >>> biased.linear.shape  # one weight per item column and task
        torch.Size([2, 2])
    """

    def __init__(
        self,
        interaction: DotInteraction,
        num_tasks: int,
        tasks: Sequence[int],
        first_order: Sequence[str] = (),
    ) -> None:
        super().__init__()
        if not tasks or not all(0 <= t < num_tasks for t in tasks):
            raise ValueError(f"dot logits: tasks {list(tasks)}, expected some of 0..{num_tasks - 1}")
        blocks = interaction.blocks
        unknown = [name for name in first_order if name not in blocks]
        if unknown or len(set(first_order)) != len(first_order):
            raise ValueError(
                f"dot logits: first-order features {list(first_order)}, expected distinct pooled features "
                f"of {list(blocks)}"
            )
        # the interaction's column indices, copied: the interaction itself stays the input arch's
        for name in ("left_columns", "right_columns", "pair_sums"):
            self.register_buffer(name, getattr(interaction, name).clone(), persistent=False)
        chosen = torch.zeros(len(interaction.pairs), num_tasks)
        chosen[:, list(tasks)] = 1.0
        # [pairs, tasks]: a product's weight in a task's logit; the mask keeps the others at 0
        self.scale = nn.Parameter(chosen.clone())
        self.register_buffer("chosen", chosen, persistent=False)
        columns = [c for name in first_order for c in range(blocks[name][0], sum(blocks[name]))]
        self.register_buffer("linear_columns", torch.tensor(columns, dtype=torch.long), persistent=False)
        # [columns, tasks], drawn as nn.Linear draws its weights: a row's bias starts to be learned
        # at once (at 0, an embedding's gradient through this term would start at 0 too). Without
        # first-order features there is no parameter: a model's state and random draws stay as
        # they were before the term existed
        self.register_parameter("linear", None)
        if columns:
            bound = 1.0 / len(columns) ** 0.5
            drawn = torch.empty(len(columns), num_tasks).uniform_(-bound, bound)
            self.linear = nn.Parameter(drawn * chosen[0])  # 0 for the tasks not chosen

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled [B, sum(widths)] -> [B, num_tasks]."""
        dots = pair_products(pooled, self.left_columns, self.right_columns, self.pair_sums)
        logits = dots @ (self.scale * self.chosen)
        if self.linear is None:
            return logits
        # every row of ``chosen`` is the same task mask (one per pair): row 0 masks the weights
        return logits + pooled.index_select(1, self.linear_columns) @ (self.linear * self.chosen[0])
