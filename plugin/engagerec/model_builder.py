"""The model a config describes for prepared data: engagerec's own path into MultiTaskModel.

The schema's id spaces become an EmbeddingBagCollection (``FeatureSpec``), built here and
handed to ``MultiTaskModel`` exactly as a TorchRec user hands in their own: one code path.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from engagerec.attention import TargetAttention, not_embedded
from engagerec.config import (
    DotLogitsConfig,
    ExperimentConfig,
    ModelConfig,
    TargetAttentionConfig,
    TaskConfig,
    prepared_dir,
)
from engagerec.data.schema import DatasetSchema, position_names
from engagerec.embedding_backward import loop_tables
from engagerec.errors import ConfigError
from engagerec.features import FeatureSpec
from engagerec.interactions import DotInteraction, DotLogits
from engagerec.losses import build_loss_weighting
from engagerec.managed_ids import ManagedCollisionTables, managed_specs
from engagerec.model import MultiTaskModel
from engagerec.tasks import Task
from engagerec.towers.registry import build_tower


def build_model(
    schema: DatasetSchema,
    cfg: ModelConfig,
    device: Optional[torch.device] = None,
    loop_backward: bool = False,
) -> MultiTaskModel:
    """
    The model a config describes for prepared data: an EmbeddingBagCollection of the spec
    ``cfg.embeddings`` makes, the tasks from ``cfg.tasks`` (or ``tasks_from_schema``), the tower
    from ``cfg.tower`` (built on the default device) and the loss weighting from ``cfg.loss``.

    Args:
        schema (DatasetSchema): the prepared data's schema.
        cfg (ModelConfig): the model section of a config.
        device (Optional[torch.device]): where the embedding tables are created
            (``torch.device("meta")`` lets DistributedModelParallel materialise them). Default: None.
        loop_backward (bool): give the large tables that one feature reads an empty companion
            feature, so that FBGEMM's CPU backward runs its loop for them
            (engagerec.embedding_backward; the same model and updates). A schema with a
            managed id space keeps every table as built. Default: False.

    Returns:
        MultiTaskModel: the model, its pooled features in ``FeatureSpec.feature_names`` order.

    Raises:
        ConfigError: if a task's label is not in the prepared data, or a task trained with
            cross-entropy reads a label with training values outside [0, 1].

    Example::

        >>> from engagerec.config import load_config
        >>> from engagerec.data.schema import DatasetSchema, DenseFeature, LabelSpec, SparseFeature
        >>> from engagerec.model_builder import build_model
        >>> schema = DatasetSchema(
        ...     features=[],
        ...     sparse=[SparseFeature("item", "item", multi=False)],
        ...     dense=[DenseFeature("x", "x", "none", 0.0, 1.0, None)],
        ...     labels=[LabelSpec("watch_ratio", "regression"), LabelSpec("skip", "binary")],
        ...     vocab_sizes={"item": 9},
        ... )
        >>> model = build_model(schema, load_config("kuairand_mmoe").model, device=torch.device("meta"))
        >>> model.feature_names, model.dense_in_features, [t.name for t in model.tasks]
        (['item'], 1, ['watch_ratio', 'skip'])
    """
    spec = FeatureSpec.from_schema(schema, cfg.embeddings)
    tasks = [Task(t) for t in (cfg.tasks or tasks_from_schema(schema))]
    missing = [t.label for t in tasks if t.label not in schema.label_names]
    if missing:
        raise ConfigError(
            f"model.tasks: labels {missing} are not in the prepared data (labels: {schema.label_names})"
        )
    _check_soft_labels(tasks, schema)
    _check_dot_logits(cfg, spec)
    input_arch = target_attention(spec, schema, cfg.target_attention) if cfg.target_attention else None
    if cfg.dot_interactions:
        input_arch = dot_interaction(
            spec, cfg.dot_interactions, inner=input_arch, detached=cfg.dot_logits.detached
        )
    input_dim = input_arch.output_dim + spec.dense_dim if input_arch else spec.input_dim
    logit_offsets = dot_logits(input_arch, tasks, cfg.dot_logits) if cfg.dot_logits.tasks else None
    try:
        tower = build_tower(cfg.tower.name, input_dim, len(tasks), **cfg.tower.params)
    except KeyError as err:  # an unknown name, with the nearest registered one
        raise ConfigError(f"model.tower.name: {err.args[0]}") from None
    except (TypeError, ValueError) as err:  # a parameter the tower does not take, or a bad value
        raise ConfigError(f"model.tower '{cfg.tower.name}' with params {cfg.tower.params}: {err}") from None
    # the tables after the tower: the order seeded runs have always drawn their initial weights in
    configs = loop_tables(spec.tables) if loop_backward and not schema.managed else spec.tables
    tables = EmbeddingBagCollection(tables=configs, device=device) if spec.tables else None
    if tables is not None and schema.managed:  # id spaces whose rows are assigned while training
        histories = [f for f in schema.features if f["kind"] == "history" and not f.get("positions")]
        lengths = {f["name"]: f["length"] for f in histories}
        tables = ManagedCollisionTables(tables, managed_specs(schema, spec.tables, lengths))
    return MultiTaskModel(
        tables,
        dense_in_features=spec.dense_dim,
        tower=tower,
        tasks=tasks,
        feature_names=spec.feature_names if spec.tables else None,
        loss_weighting=build_loss_weighting(cfg.loss, [t.weight for t in tasks]),
        input_arch=input_arch,
        logit_offsets=logit_offsets,
    )


def _check_dot_logits(cfg: ModelConfig, spec: FeatureSpec) -> None:
    """Refuse a ``model.dot_logits`` that cannot work: detached or first-order features not
    embedded; detached features under target attention, or in no dot pair; first-order features
    named twice; detached or first-order features with no task; tasks without
    ``model.dot_interactions``."""
    logits = cfg.dot_logits
    for key in ("detached", "first_order"):
        unknown = sorted(set(getattr(logits, key)) - set(spec.feature_widths))
        if unknown:
            raise ConfigError(f"model.dot_logits.{key}: {not_embedded(unknown, list(spec.feature_widths))}")
    if len(set(logits.first_order)) != len(logits.first_order):
        raise ConfigError(f"model.dot_logits.first_order: {logits.first_order} names a feature twice")
    if logits.first_order and not logits.tasks:
        raise ConfigError(
            "model.dot_logits.first_order: without dot_logits.tasks there is no logit to add to"
        )
    if logits.detached and cfg.target_attention:
        raise ConfigError(
            "model.dot_logits.detached cannot be combined with model.target_attention: the attention's "
            "output mixes the features, so none can reach the tower detached"
        )
    if logits.detached and not logits.tasks:
        raise ConfigError("model.dot_logits.detached: without dot_logits.tasks their tables learn nothing")
    dotted = {name for pair in cfg.dot_interactions for name in pair}
    undotted = [name for name in logits.detached if name not in dotted and name not in logits.first_order]
    if undotted:  # the tower is their only path: detached, they would learn nothing
        raise ConfigError(
            f"model.dot_logits.detached: {undotted} are in no pair of model.dot_interactions (nor in "
            "dot_logits.first_order), so their tables would learn nothing"
        )
    if logits.tasks and not cfg.dot_interactions:
        raise ConfigError("model.dot_logits adds the dot products to logits: it needs model.dot_interactions")


def dot_logits(input_arch: DotInteraction, tasks: List[Task], cfg: DotLogitsConfig) -> DotLogits:
    """The DotLogits ``model.dot_logits`` describes: the named tasks' logits add the products of
    ``input_arch``'s pairs, and the first-order terms of its ``first_order`` features.

    Args:
        input_arch (DotInteraction): the model's input arch.
        tasks (List[Task]): the model's tasks, in order.
        cfg (DotLogitsConfig): ``model.dot_logits``.

    Returns:
        DotLogits: over the interaction's pairs.

    Raises:
        ConfigError: a task name that is no task, or repeats.
        ValueError: a first-order feature that is not pooled, or repeats (``build_model`` refuses
            both as a ConfigError first).

    Example::

        >>> from engagerec.config import DotLogitsConfig, TaskConfig
        >>> from engagerec.interactions import DotInteraction
        >>> arch = DotInteraction([2, 2], ["user", "item"], [("user", "item")])
        >>> configs = [TaskConfig("watch_ratio", "watch_ratio"), TaskConfig("skip", "skip", "binary")]
        >>> logits = dot_logits(arch, [Task(config) for config in configs], DotLogitsConfig(["watch_ratio"]))
        >>> logits.scale.tolist()  # the one product's weight in each task's logit
        [[1.0, 0.0]]
    """
    known = [task.name for task in tasks]
    names = cfg.tasks
    unknown = [name for name in names if name not in known]
    if unknown or len(set(names)) != len(names):
        raise ConfigError(f"model.dot_logits.tasks: {names}, expected distinct task names of {known}")
    return DotLogits(input_arch, len(tasks), [known.index(name) for name in names], cfg.first_order)


def target_attention(spec: FeatureSpec, schema: DatasetSchema, cfg: TargetAttentionConfig) -> TargetAttention:
    """The TargetAttention ``model.target_attention`` describes, over the pooled columns of ``spec``.

    Args:
        spec (FeatureSpec): the model's tables (their feature order is the pooled columns').
        schema (DatasetSchema): the prepared data's schema (the history's length and kind).
        cfg (TargetAttentionConfig): which history, which candidate, the MLP's sizes.

    Returns:
        TargetAttention: its ``output_dim`` replaces ``spec.sparse_dim`` in the tower's input.

    Example: ``tests/test_attention.py`` (``build_model`` calls it when the
    config has ``model.target_attention``).

    Raises:
        ConfigError: the history is no positional history feature of the prepared data, or the
            candidate is not embedded in the history's table.
    """
    history = next((f for f in schema.features if f["name"] == cfg.history), None)
    if history is None or history["kind"] != "history" or not history.get("positions"):
        raise ConfigError(
            f"model.target_attention.history '{cfg.history}' is no history feature with positions: true "
            "in the prepared data (prepare it with that feature)"
        )
    widths = spec.feature_widths
    positions = position_names(cfg.history, history["length"])
    table = next((t for t in spec.tables if positions[0] in t.feature_names), None)
    if table is None:
        raise ConfigError(f"model.target_attention.history '{cfg.history}' has no embedding table")
    single = {f.name for f in schema.sparse if not f.multi}
    if cfg.candidate not in table.feature_names or cfg.candidate not in single:
        raise ConfigError(
            f"model.target_attention.candidate '{cfg.candidate}' is not embedded in the history's table "
            f"{table.name} as one id per row (its features: {table.feature_names})"
        )
    return TargetAttention(
        list(widths.values()), list(widths), cfg.candidate, positions, hidden_sizes=cfg.hidden_sizes
    )


def dot_interaction(
    spec: FeatureSpec, pairs: List[List[str]], inner: Optional[nn.Module] = None, detached: List[str] = ()
) -> DotInteraction:
    """The DotInteraction ``model.dot_interactions`` describes, over the pooled columns of ``spec``.

    Args:
        spec (FeatureSpec): the model's tables (their feature order is the pooled columns').
        pairs (List[List[str]]): the pairs of pooled features (two names each).
        inner (Optional[nn.Module]): the input arch before it (the target attention), if any.
        detached (List[str]): features the tower reads without passing its gradient back
            (``model.dot_logits.detached``).

    Returns:
        DotInteraction: its ``output_dim`` replaces the sparse width in the tower's input.

    Raises:
        ConfigError: a pair is not two names, or names a feature the model does not embed,
            or two features of different widths.

    Example::

        >>> from engagerec.config import EmbeddingConfig
        >>> from engagerec.data.schema import DatasetSchema, SparseFeature
        >>> schema = DatasetSchema(
        ...     features=[],
        ...     sparse=[SparseFeature(name, name, multi=False) for name in ("user", "item")],
        ...     dense=[],
        ...     labels=[],
        ...     vocab_sizes={"user": 5, "item": 9},
        ... )
        >>> spec = FeatureSpec.from_schema(schema, EmbeddingConfig(dim=4))
        >>> dot_interaction(spec, [["user", "item"]]).output_dim  # 4 + 4 pooled columns and one product
        9
    """
    bad = [pair for pair in pairs if len(pair) != 2]
    if bad:
        raise ConfigError(f"model.dot_interactions: each entry is a pair of two feature names, got {bad}")
    widths = spec.feature_widths
    try:
        return DotInteraction(
            list(widths.values()),
            list(widths),
            [(a, b) for a, b in pairs],
            inner=inner,
            detached=detached,
        )
    except ValueError as err:
        raise ConfigError(f"model.dot_interactions: {err}") from None


def tasks_from_schema(schema: DatasetSchema) -> List[TaskConfig]:
    """
    One task per label of the prepared data, named after it, of its kind, with weight 1: a
    regression head ends in a sigmoid when every train value of its label lies in [0, 1] (a
    ratio, per the train split's label summary in ``schema.meta``), else in the identity.
    What ``build_model`` uses when the config names no tasks.

    Args:
        schema (DatasetSchema): the prepared data's schema.

    Returns:
        List[TaskConfig]: one per ``schema.labels``, in order.

    Example::

        >>> from engagerec.data.schema import DatasetSchema, LabelSpec
        >>> from engagerec.model_builder import tasks_from_schema
        >>> ranges = {"watch_ratio": {"min": 0.0, "max": 1.0}, "watch_time": {"min": 0.0, "max": 310.5}}
        >>> train = {"labels": ranges}
        >>> schema = DatasetSchema(
        ...     features=[],
        ...     sparse=[],
        ...     dense=[],
        ...     labels=[LabelSpec("watch_ratio", "regression"), LabelSpec("watch_time", "regression")],
        ...     vocab_sizes={},
        ...     meta={"summary": {"split": {"train": train}}},
        ... )
        >>> [(task.name, task.kind, task.output) for task in tasks_from_schema(schema)]
        [('watch_ratio', 'regression', 'sigmoid'), ('watch_time', 'regression', 'identity')]
    """
    stats = schema.meta.get("summary", {}).get("split", {}).get("train", {}).get("labels", {})
    tasks = []
    for label in schema.labels:
        low, high = stats.get(label.name, {}).get("min"), stats.get(label.name, {}).get("max")
        unit = low is not None and high is not None and 0 <= low and high <= 1
        output = "sigmoid" if unit else "identity"
        tasks.append(TaskConfig(name=label.name, label=label.name, kind=label.kind, output=output))
    return tasks


def configured_tasks(cfg: ExperimentConfig) -> List[TaskConfig]:
    """
    The tasks a run of ``cfg`` trains: ``model.tasks`` when the config names them, else one
    per label of its prepared data (``tasks_from_schema``), as ``build_model``
    builds them.

    Args:
        cfg (ExperimentConfig): the experiment; its prepared data must exist when it names no tasks.

    Returns:
        List[TaskConfig]: the tasks, in order.

    Example::

        >>> from engagerec.config import load_config
        >>> [task.name for task in configured_tasks(load_config("kuairand_stats"))]
        ['watch_ratio', 'skip']
    """
    return list(cfg.model.tasks) or tasks_from_schema(DatasetSchema.load(prepared_dir(cfg)))


def _check_soft_labels(tasks: List[Task], schema: DatasetSchema) -> None:
    """Cross-entropy reads a regression label as a probability: refuse one whose training
    values (the train split's label summary) leave [0, 1], where its loss has no minimum."""
    stats = schema.meta.get("summary", {}).get("split", {}).get("train", {}).get("labels", {})
    for task in tasks:
        if task.kind != "regression" or task.cfg.loss != "cross_entropy":
            continue
        low, high = stats.get(task.label, {}).get("min"), stats.get(task.label, {}).get("max")
        if low is not None and high is not None and not 0 <= low <= high <= 1:
            raise ConfigError(
                f"model.tasks: task '{task.name}' trains with cross-entropy, which reads label "
                f"'{task.label}' as a probability; its training values lie in [{low:g}, {high:g}], "
                "expected [0, 1] (loss: mse, or cap the ratio)"
            )
