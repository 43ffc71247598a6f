"""Batch: what the reader yields and the model consumes; a TorchRec Pipelineable."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable


@dataclass
class Batch(Pipelineable):
    """
    One batch of B rows, as the reader yields it and MultiTaskModel consumes it. A TorchRec
    ``Pipelineable``: ``to``, ``record_stream`` and ``pin_memory`` act on every tensor, so
    TorchRec's train pipelines can copy it to the device ahead of the step.

    Args:
        dense_features (torch.Tensor): [B, num_dense] float32, one column per dense feature.
        sparse_features (KeyedJaggedTensor): one key per sparse feature, its ids per row.
        labels (Dict[str, torch.Tensor]): label name -> [B] float32.
        weights (torch.Tensor): [B] float32, 1 for real rows and 0 for the padding rows that
            keep ranks in lock-step during evaluation (metrics ignore them).
        label_weights (Dict[str, torch.Tensor]): label name -> [B] float32: ``weights``, and
            0 where that label is missing (the label value is then 0 and counts for nothing:
            no loss, no metric).

    Example::

        >>> import torch
        >>> from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
        >>> from engagerec.batch import Batch
        >>> batch = Batch(
        ...     dense_features=torch.zeros(3, 1),
        ...     sparse_features=KeyedJaggedTensor.from_lengths_sync(
        ...         keys=["item"], values=torch.tensor([1, 4, 7]), lengths=torch.tensor([1, 1, 1])
        ...     ),
        ...     labels={"skip": torch.tensor([1.0, 0.0, 0.0])},
        ...     weights=torch.tensor([1.0, 1.0, 0.0]),  # the last row is padding
        ...     label_weights={"skip": torch.tensor([1.0, 1.0, 0.0])},
        ... )
        >>> batch.batch_size, batch.sparse_features.keys()
        (3, ['item'])
        >>> batch.to(torch.device("cpu")).label_weights["skip"]
        tensor([1., 1., 0.])
    """

    dense_features: torch.Tensor
    sparse_features: KeyedJaggedTensor
    labels: Dict[str, torch.Tensor]
    weights: torch.Tensor
    label_weights: Dict[str, torch.Tensor]

    @property
    def batch_size(self) -> int:
        """B, the number of rows (padding rows included)."""
        return self.dense_features.shape[0]

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        """A copy with every tensor on ``device``."""
        return Batch(
            dense_features=self.dense_features.to(device=device, non_blocking=non_blocking),
            sparse_features=self.sparse_features.to(device=device, non_blocking=non_blocking),
            labels={k: v.to(device=device, non_blocking=non_blocking) for k, v in self.labels.items()},
            weights=self.weights.to(device=device, non_blocking=non_blocking),
            label_weights={
                k: v.to(device=device, non_blocking=non_blocking) for k, v in self.label_weights.items()
            },
        )

    def record_stream(self, stream: torch.Stream) -> None:
        """Mark every tensor as used on ``stream``, so the caching allocator does not reuse its
        memory before the work queued there is done (needed when the batch was copied on a side stream)."""
        self.dense_features.record_stream(stream)
        self.sparse_features.record_stream(stream)
        for value in self.labels.values():
            value.record_stream(stream)
        self.weights.record_stream(stream)
        for value in self.label_weights.values():
            value.record_stream(stream)

    def pin_memory(self) -> "Batch":
        """A copy with every tensor in page-locked host memory, so ``to(..., non_blocking=True)``
        can overlap the copy with compute."""
        return Batch(
            dense_features=self.dense_features.pin_memory(),
            sparse_features=self.sparse_features.pin_memory(),
            labels={k: v.pin_memory() for k, v in self.labels.items()},
            weights=self.weights.pin_memory(),
            label_weights={k: v.pin_memory() for k, v in self.label_weights.items()},
        )
