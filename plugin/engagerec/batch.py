"""Batch: what the reader yields and the model consumes; a TorchRec Pipelineable."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable


@dataclass
class Batch(Pipelineable):
    """sparse_features: one key per sparse feature; dense_features: [B, num_dense] float32;
    labels: label name -> [B] float32; weights: [B] float32, 1 for real rows and 0 for the
    padding rows that keep ranks in lock-step during evaluation (metrics ignore them);
    label_weights: label name -> [B] float32, ``weights`` and 0 where that label is missing
    (the label value is then 0 and counts for nothing: no loss, no metric)."""

    dense_features: torch.Tensor
    sparse_features: KeyedJaggedTensor
    labels: Dict[str, torch.Tensor]
    weights: torch.Tensor
    label_weights: Dict[str, torch.Tensor]

    @property
    def batch_size(self) -> int:
        return self.dense_features.shape[0]

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
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
        self.dense_features.record_stream(stream)
        self.sparse_features.record_stream(stream)
        for value in self.labels.values():
            value.record_stream(stream)
        self.weights.record_stream(stream)
        for value in self.label_weights.values():
            value.record_stream(stream)

    def pin_memory(self) -> "Batch":
        return Batch(
            dense_features=self.dense_features.pin_memory(),
            sparse_features=self.sparse_features.pin_memory(),
            labels={k: v.pin_memory() for k, v in self.labels.items()},
            weights=self.weights.pin_memory(),
            label_weights={k: v.pin_memory() for k, v in self.label_weights.items()},
        )
