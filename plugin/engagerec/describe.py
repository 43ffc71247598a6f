"""Parameter counts per part of a MultiTaskModel: each embedding table, the tower, each head."""

from __future__ import annotations

from typing import Dict, List

from torch import nn

from engagerec.model import MultiTaskModel


def parameter_counts(model: MultiTaskModel) -> Dict[str, int]:
    """Parameters per part: ``embeddings/<table>`` (rows x dim), ``input arch`` (e.g. target
    attention, when the model has one), ``logit offsets`` (e.g. DotLogits, when it has them), ``tower``
    and ``head/<task>``."""
    counts: Dict[str, int] = {}
    if model.has_sparse:
        for table in model.tables:
            counts[f"embeddings/{table.name}"] = table.num_embeddings * table.embedding_dim
    if model.input_arch is not None:
        counts["input arch"] = _count(model.input_arch)
    if model.logit_offsets is not None:
        counts["logit offsets"] = _count(model.logit_offsets)
    counts["tower"] = _count(model.tower)
    for task, head in zip(model.tasks, model.heads, strict=True):
        counts[f"head/{task.name}"] = _count(head)
    return counts


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def format_parameter_table(rows: Dict[str, Dict[str, int]]) -> str:
    """rows: tower name -> parameter_counts(); one column per tower, one row per part."""
    towers = list(rows)
    parts: List[str] = []
    for counts in rows.values():
        parts += [p for p in counts if p not in parts]
    lines = ["| part | " + " | ".join(towers) + " |", "|---|" + "---:|" * len(towers)]
    for part in parts:
        lines.append(f"| {part} | " + " | ".join(f"{rows[t].get(part, 0):,}" for t in towers) + " |")
    totals = {t: sum(c.values()) for t, c in rows.items()}
    dense = {t: sum(v for k, v in c.items() if not k.startswith("embeddings/")) for t, c in rows.items()}
    lines.append("| **dense total** | " + " | ".join(f"{dense[t]:,}" for t in towers) + " |")
    lines.append("| **total** | " + " | ".join(f"{totals[t]:,}" for t in towers) + " |")
    return "\n".join(lines)
