"""Typed experiment configuration: dataclasses loaded strictly from YAML.

Strict means an unknown key is an error that names the nearest valid key, and a
value of the wrong type is an error that names its dotted path. ``--set a.b=c``
overrides are applied to the raw mapping before it is typed, so they get the same
checks as the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional

import yaml

from engagerec.errors import ConfigError

# ---------------------------------------------------------------------------- data


@dataclass
class FeatureConfig:
    """One input feature and how it is encoded.

    kind:
      categorical  one id per row -> vocabulary (fitted on train) -> embedding table
      multi_hot    a separator-joined list of ids per row (e.g. genres) -> one bag
      numeric      a float -> optional transform -> standardised dense input;
                   ``buckets`` > 0 also adds a quantile-bucket sparse feature
      history      the user's last ``length`` ``of`` ids strictly before this row
      history_mean the mean of a label (``of``: watch_ratio or skip) over the user's last
                   ``length`` views strictly before this row: numeric, first views imputed
      target_mean  the mean of a label (``of``) over the training rows with this row's id
                   (``column``), shrunk to the training mean by ``smoothing`` rows; training
                   rows are cross-fitted over ``folds`` folds, or with ``scheme: ordered``
                   every row sees the id's training rows before it, with ``scheme: online``
                   the id's rows of every split before it (engagerec.data.target_stats)
      id_count     how many training rows have this row's id (``column``), itself left out
                   (or, by ``scheme``, as target_mean counts them)
    """

    name: str
    kind: Literal[
        "categorical", "multi_hot", "numeric", "history", "history_mean", "target_mean", "id_count"
    ] = "categorical"
    column: Optional[str] = None  # source column; defaults to ``name``
    id_space: Optional[str] = None  # features sharing an id space share a vocab/table
    min_count: int = 1  # rarer ids map to the out-of-vocabulary row
    separator: str = ","
    # multi_hot: keep only a row's first this many ids (0: all of them), e.g. a video's first
    # listed genre, its primary one, as a feature of its own beside the whole bag (which shares
    # the bag's id space and table, as any feature of the same column, unless id_space is set)
    max_items: int = 0
    transform: Literal["none", "log1p"] = "none"  # numeric, id_count
    missing: Literal["error", "mean"] = "error"  # numeric: mean imputes the train mean
    buckets: int = 0  # numeric: exact train quantiles (DuckDB quantile_cont), then a sparse bucket id
    length: int = 20  # history length
    # history: one feature per position of the window (<name>@0 the oldest, each 0 or 1 id)
    # instead of one bag: the unpooled sequence that model.target_attention reads
    positions: bool = False
    of: str = "content_id"  # history: which id column; history_mean, target_mean: which label
    # categorical / history: id spaces larger than this many rows are hashed into this many
    # buckets (row 0 stays the OOV/missing row) instead of keeping a vocabulary; 0: never
    hash_buckets: int = 0
    # categorical / history: rows of a table whose ids torchrec's managed-collision module
    # (MCH) assigns while training, so ids first seen after prepare get rows of their own
    # (engagerec.managed_ids); the last row is shared by ids without one. 0: a vocabulary
    managed_collisions: int = 0
    eviction_policy: Literal["distance_lfu", "lfu", "lru"] = "distance_lfu"  # managed_collisions
    eviction_interval: int = 1  # managed_collisions: training steps between admissions
    smoothing: float = 10.0  # target_mean: weight of the training mean, in rows
    folds: int = 5  # target_mean: cross-fitting folds of the training rows
    # target_mean, id_count: cross_fit (other folds' training rows) | ordered (training rows
    # strictly before this row's timestamp: leak-free under a temporal split) | online (rows of
    # every split strictly before this row's timestamp: what a server's live counters hold)
    scheme: Literal["cross_fit", "ordered", "online"] = "cross_fit"
    # online: only views at least this many timestamp units earlier (a counter's delay; 0:
    # every earlier moment, including views that may still be playing when this one starts)
    lag: float = 0.0


@dataclass
class WatchRatioConfig:
    """watch_ratio = watch_time / duration, for every row (it defines the skip labels, and
    rows whose duration or watch time is unusable are dropped, counted)."""

    ratio_cap: float = 1.0
    # What to do with ratios above ratio_cap (replays): clip them to the cap, drop
    # the row (counted), or keep them unchanged.
    over_cap: Literal["clip", "drop", "keep"] = "clip"


@dataclass
class LabelConfig:
    """One label column of the prepared data (a task's target).

    Derived (``column`` unset): kind regression is the watch ratio itself; kind binary is a
    skip label, ``watch_ratio < threshold``. With ``relative_to`` the cut is the group's own:
    skip when the ratio is below the ``threshold`` quantile of the training rows' ratios in the
    row's group (``user``: the same user's views, so a skip is relative to that user's habits;
    ``duration``: views of videos whose duration lies within the same power of two), the
    training split's quantile for a group without training rows (counted). Raw (``column``
    set): a column of the interaction log, e.g. KuaiRand's is_click, long_view or label
    (like / hate); binary values must be 0 or 1. A missing raw value gives the row weight 0
    for this label only (counted).
    """

    name: str
    kind: Literal["regression", "binary"] = "regression"
    column: Optional[str] = None
    threshold: float = 0.5  # derived binary: watch_ratio < threshold (a quantile with relative_to)
    relative_to: Optional[Literal["user", "duration"]] = None


def study_labels() -> List[LabelConfig]:
    """The study's two labels: the watch ratio and skip = watch ratio < 0.5."""
    return [LabelConfig(name="watch_ratio", kind="regression"), LabelConfig(name="skip", kind="binary")]


@dataclass
class FilterConfig:
    """Rows dropped before the split: users with too few views, and views with zero watch time."""

    min_user_views: int = 10  # keep users with MORE than this many views (the study's rule)
    drop_zero_watch_time: bool = True


@dataclass
class SplitConfig:
    """How the kept rows are split into train, val and test: random, temporal or by user, seeded."""

    kind: Literal["random", "temporal", "user"] = "random"
    test_fraction: float = 0.3
    val_fraction: float = 0.1  # carved from train, never from test
    seed: int = 0


@dataclass
class SyntheticConfig:
    """Parameters of the generators in engagerec.data.synthetic."""

    kind: Literal["study", "mmoe"] = "study"
    num_rows: int = 100_000
    num_users: int = 2_000
    num_contents: int = 1_000
    num_genres: int = 20
    latent_dim: int = 8
    noise: float = 0.3
    seed: int = 0
    # MMoE generator (Ma et al. 2018, section 3.2)
    input_dim: int = 100
    task_correlation: float = 0.5
    num_sin: int = 10


@dataclass
class SourceConfig:
    """Where the three tables come from.

    adapter:
      tables     generic interactions/users/content files + a column mapping
      study      the study's own schema (age, gender; genres, rating, duration)
      kuairand   KuaiRand's official layout (log_*.csv, user_features_*.csv, ...)
      synthetic  generated in the study's schema (see ``synthetic``)
    """

    adapter: str = "tables"
    interactions: Optional[str] = None  # file, or a directory/glob for kuairand logs
    users: Optional[str] = None
    content: Optional[str] = None
    # canonical name -> name in the files (user_id, content_id, watch_time, duration, timestamp)
    columns: Dict[str, str] = field(default_factory=dict)
    # unjoined ids: error | keep (features missing -> OOV / imputed) | drop (counted)
    unjoined_users: Literal["error", "keep", "drop"] = "error"
    unjoined_content: Literal["error", "keep", "drop"] = "error"
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class DataConfig:
    """What ``prepare`` reads and writes: sources, features, labels, filters, split, shards, DuckDB limits."""

    source: SourceConfig = field(default_factory=SourceConfig)
    features: List[FeatureConfig] = field(default_factory=list)
    watch_ratio: WatchRatioConfig = field(default_factory=WatchRatioConfig)
    labels: List[LabelConfig] = field(default_factory=study_labels)
    filters: FilterConfig = field(default_factory=FilterConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    row_group_size: int = 65_536
    rows_per_file: int = 1_048_576
    # The out-of-core engine (DuckDB) spills to disk past this; "" lets DuckDB choose (80% of RAM).
    # auto: 0.6 x the source files' bytes, at least 1GB, at most half the machine's memory
    # (data.tables.resolve_memory_limit; schema.json's summary records it). 1GB keeps KuaiRand-1K
    # (11.7M rows, 1.26 GB of files) at 1.36 GiB; a larger log wants more, or its joins and windows
    # spill and prepare grows faster than the rows (4GB at 58.6M rows: docs/EXPERIMENTS.md)
    memory_limit: str = "auto"
    threads: int = 0  # 0: one per core


# --------------------------------------------------------------------------- model


@dataclass
class EmbeddingConfig:
    """One embedding table per id space (features sharing an id space share a table, unless
    ``own_table`` names them)."""

    dim: int = 16
    dims: Dict[str, int] = field(default_factory=dict)  # per id space
    # Size small tables by the rule of thumb dim ~ 6 * rows^(1/4) (rounded to a multiple of 4,
    # at most ``dim``): a 3-value feature needs no 16 columns, and the tower's first layer,
    # the costliest matmul, shrinks with its input. ``dims`` entries win.
    auto_dim: bool = False
    # per feature: sum | mean. A table has one pooling, so multi-valued features sharing
    # a table must agree; defaults: history -> mean, everything else -> sum.
    pooling: Dict[str, Literal["sum", "mean"]] = field(default_factory=dict)
    # per id space: rows start uniform in [-s, s] instead of TorchRec's [-1/sqrt(rows),
    # 1/sqrt(rows)] (about 7e-4 for a 2M-row table). Not what held back the dot interactions'
    # factors at the KuaiRand-1K shape: +-0.1 changed nothing there (docs/EXPERIMENTS.md)
    init_scale: Dict[str, float] = field(default_factory=dict)
    # sparse features that get a table of their own, keeping their id space's vocabulary (its
    # ids, rows, width and init_scale): FBGEMM's CPU backward with the fused row-wise Adagrad
    # runs its vectorised, multi-threaded kernel only for a table read by one feature, and a
    # scalar one-thread loop for a shared table (a video id and its 20-long history: about twice
    # the time, docs/EXPERIMENTS.md). The cost: another table of the space's rows, which the
    # space's other features do not train. Not for managed-collision spaces (one remapping per
    # table would give one id two rows)
    own_table: List[str] = field(default_factory=list)


@dataclass
class DotLogitsConfig:
    """The dot products of ``model.dot_interactions`` added straight to tasks' logits, each times a
    learned scale that starts at 1 (engagerec.interactions.DotLogits): matrix factorisation's
    path from a product to the loss, beside the tower's."""

    # the tasks whose logits add the products: ones whose logit rises with the affinity (a
    # watch ratio, not a skip); the others read the products in the tower
    tasks: List[str] = field(default_factory=list)
    # pooled features the tower reads without passing its gradient back, with the products they
    # are in: their tables learn from these logits alone (and train.embedding_l2; a table shared
    # with a feature not listed still learns through it: list every feature of the table). Within
    # one epoch the tower's gradient, every task's mixed in, otherwise drowns the factors'
    # (docs/EXPERIMENTS.md)
    detached: List[str] = field(default_factory=list)
    # pooled features whose embeddings also add a learned linear term, <w, e>, to those logits: a
    # factorisation machine's first-order term, each id's bias held in its own row. A detached
    # table has no other path to learn a per-id bias (docs/EXPERIMENTS.md)
    first_order: List[str] = field(default_factory=list)


@dataclass
class TowerConfig:
    """Which registered tower the model uses (``name``) and the keyword arguments to build it."""

    name: str = "mmoe"
    params: Dict[str, Any] = field(default_factory=dict)  # passed to the tower's constructor


@dataclass
class TaskConfig:
    """One prediction task. Adding a task is config: name its label column and kind."""

    name: str
    label: str
    kind: Literal["regression", "binary"] = "regression"
    weight: float = 1.0  # omega in the study's eq. 12
    head_sizes: List[int] = field(default_factory=list)  # task-specific MLP before the output unit
    output: Literal["sigmoid", "identity"] = "sigmoid"  # regression output: a ratio in [0, 1], or any value
    # a regression task's loss: squared error (the study's, when unset), or cross-entropy against
    # the ratio as a soft label (a sigmoid output only; same optimum, the conditional mean);
    # binary tasks always train with cross-entropy on the logit and take no loss
    loss: Optional[Literal["mse", "cross_entropy"]] = None


def study_tasks() -> List[TaskConfig]:
    """The study's two tasks (used by tests and examples; configs name their tasks or get one per label)."""
    return [
        TaskConfig(name="watch_ratio", label="watch_ratio", kind="regression", output="sigmoid"),
        TaskConfig(name="skip", label="skip", kind="binary"),
    ]


@dataclass
class LossConfig:
    """How task losses combine: fixed (the study's eq. 12 with the tasks' weights),
    uncertainty (Kendall et al. 2018) or gradnorm (Chen et al. 2018)."""

    weighting: Literal["fixed", "uncertainty", "gradnorm"] = "fixed"
    gradnorm_alpha: float = 1.5


@dataclass
class TargetAttentionConfig:
    """DIN-style target attention (Zhou et al., KDD 2018) in front of the tower: the candidate's
    embedding weighs each viewed item of a positional history (a ``history`` feature with
    ``positions: true``) and their weighted sum replaces the history's columns in the tower's
    input (engagerec.attention.TargetAttention)."""

    history: str = "history"  # the positional history feature
    candidate: str = "content_id"  # a single-id feature of the history's id space
    hidden_sizes: List[int] = field(default_factory=lambda: [32])  # the attention MLP


@dataclass
class ModelConfig:
    """The model: its embedding tables, its tower, its tasks, how their losses combine, and
    optional input arches in front of the tower: a target attention over the viewing history,
    and dot products of chosen feature pairs."""

    embeddings: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    tower: TowerConfig = field(default_factory=TowerConfig)
    # empty: one task per label of the prepared data (schema.json), with a kind-specific head
    tasks: List[TaskConfig] = field(default_factory=list)
    loss: LossConfig = field(default_factory=LossConfig)
    target_attention: Optional[TargetAttentionConfig] = None
    # pairs of pooled features whose dot products join the tower's input (DLRM's interaction,
    # engagerec.interactions.DotInteraction), e.g. [[user_id, content_id], [user_id, genres]];
    # a pair's tables must be equally wide: pin them in embeddings.dims, since auto_dim's widths
    # follow the vocabularies' sizes and so the data
    dot_interactions: List[List[str]] = field(default_factory=list)
    # the products also added to tasks' logits, a factorisation machine's term beside the tower
    dot_logits: DotLogitsConfig = field(default_factory=DotLogitsConfig)


@dataclass
class TrainConfig:
    """Training: data, batch sizes, optimisers, epochs, early stopping, checkpoints, sharding, logging."""

    seed: int = 0
    data_dir: Optional[str] = None  # prepared data (default prepared/<name>)
    batch_size: int = 1024  # per rank
    eval_batch_size: int = 8192
    gauc_group: Optional[str] = "user_id"  # evaluation's GAUC groups by this id, when the data embeds it
    epochs: int = 10
    max_steps: int = 0  # stop after this many steps in all (0: no limit)
    dense_lr: float = 1e-4  # Adam on the dense part; the study's 1e-4
    # fused into backward by FBGEMM: rowwise_adagrad | adagrad | sgd on CPU and CUDA; adam |
    # partial_rowwise_adam | lamb | partial_rowwise_lamb on CUDA only (engagerec.distributed)
    sparse_optimizer: Literal[
        "rowwise_adagrad", "adagrad", "sgd", "adam", "partial_rowwise_adam", "lamb", "partial_rowwise_lamb"
    ] = "rowwise_adagrad"
    sparse_lr: float = 0.05
    # an L2 penalty on the pooled features: this times the batch mean of their squared norms
    # joins the training loss (MultiTaskModel.embedding_l2); for a one-id feature, on its row
    # per occurrence, for a bag on the pooled sum or mean. It lets rarely seen ids shrink toward 0
    # instead of fitting their few labels' noise; the fused optimiser's own weight_decay is not
    # offered, as FBGEMM's CPU kernels ignore it
    embedding_l2: float = 0.0
    # both learning rates over the run's train.epochs (engagerec.lr_schedule): constant, or a
    # linear / cosine decay from each rate to lr_final times it as the last epoch ends (a run cut
    # short by max_steps stops on the way); a resume continues it, a warm start begins it again
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    lr_final: float = 0.0
    # early stopping on a validation metric: "loss" (sum of task weight x MSE | log loss)
    # or any reported metric such as "skip/auc" (with monitor_mode: max)
    monitor: str = "loss"
    monitor_mode: Literal["min", "max"] = "min"
    patience: int = 3
    checkpoint_every_steps: int = 0  # 0: at the end of each epoch only
    # table (or id space) -> allowed sharding types (table_wise, column_wise, data_parallel,
    # row_wise, table_row_wise); the planner chooses among them. "*" applies to every table.
    sharding: Dict[str, List[str]] = field(default_factory=dict)
    num_workers: int = 0  # loader worker processes per rank
    log_every_steps: int = 50
    # the windowed training metrics read every k-th batch, a sample that keeps their update
    # under 2% of a step (every batch cost 6% at batch 4096); evaluation reads every row
    train_metrics_every_steps: int = 4
    progress_bar: bool = True
    # where the model computes: auto is cuda when a GPU is visible, else cpu; cuda runs use
    # NCCL (one process too), cpu runs gloo
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # torch.profiler over steps profile_start_step+1 .. +profile_steps (0: off); the breakdown
    # by part goes to the run's profile.json (engagerec.profiling)
    profile_steps: int = 0
    profile_start_step: int = 20
    # what the tower computes in while training: bf16 autocasts its matmuls (AMX / AVX512-BF16
    # CPUs, GPUs); its weights, heads, losses and every evaluation stay fp32 (MultiTaskModel).
    # auto: bf16 where the device multiplies bf16 natively, else fp32 (runs.tower_autocast);
    # results.json records what a run used
    tower_precision: Literal["fp32", "bf16", "auto"] = "fp32"
    # FBGEMM's CPU backward for the tables of 100k rows or more that one feature reads: its JIT
    # kernel, or its loop (7.8x faster on an Intel Xeon with AMX: benchmarks/backward_paths.py;
    # slower on an AMD EPYC, docs/EXPERIMENTS.md). The same updates either way; auto times both
    # once per process on CPU and takes the loop where clearly faster (engagerec.embedding_backward);
    # results.json records what a run used
    embedding_backward: Literal["auto", "kernel", "loop"] = "auto"
    # where the fused tables' backward (and their optimizer update) runs on CPU: the main thread,
    # or a worker thread started when its gradient is ready, beside the rest of the step (the
    # next lookup waits for it: the same updates, engagerec.backward_overlap). auto: the worker
    # when the one-thread loop above was taken and this process has two threads or more
    embedding_backward_thread: Literal["auto", "main", "worker"] = "auto"
    # a warm start: begin from this run directory's best checkpoint (or a checkpoint directory)
    # instead of a fresh initialisation (engagerec.warm_start); a resume ignores it
    init_from: Optional[str] = None


@dataclass
class ExperimentConfig:
    """A whole config file: the experiment's ``name`` (its default paths), ``data``, ``model``, ``train``."""

    name: str = "experiment"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# what a resumed run may change: how long it runs, how it logs, where it reads and computes;
# not what it learns (model, data, optimisers, batch size, seed). tower_precision is compared
# by what it resolves to instead (auto depends on the device: train._check_resume);
# embedding_backward and embedding_backward_thread make the same updates either way
RESUMABLE_CHANGES = {
    f"train.{key}"
    for key in ("max_steps", "epochs", "patience", "progress_bar", "log_every_steps", "num_workers",
                "profile_steps", "profile_start_step", "checkpoint_every_steps", "data_dir",
                "eval_batch_size", "device", "train_metrics_every_steps", "init_from", "tower_precision",
                "embedding_backward", "embedding_backward_thread")
}  # fmt: skip


def config_changes(old: Dict[str, Any], new: Dict[str, Any], prefix: str = "") -> List[str]:
    """
    The dotted keys whose values differ between two raw configs (``dataclasses.asdict``), as
    ``key: old -> new``, leaving out what a resumed run may change (``RESUMABLE_CHANGES``).

    Args:
        old (Dict[str, Any]): the config a checkpoint was written under.
        new (Dict[str, Any]): the config of the run that would resume it.
        prefix (str): the dotted path of these mappings. Default: ``""``.

    Returns:
        List[str]: one entry per differing key, sorted.

    Example::

        >>> from engagerec.config import config_changes
        >>> old = {"train": {"dense_lr": 0.001, "max_steps": 10}, "model": {"tower": {"name": "mmoe"}}}
        >>> new = {"train": {"dense_lr": 0.002, "max_steps": 0}, "model": {"tower": {"name": "mmoe"}}}
        >>> config_changes(old, new)
        ['train.dense_lr: 0.001 -> 0.002']
    """
    changes = []
    for key in sorted(set(old) | set(new)):
        path = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += config_changes(a, b, f"{path}.")
        elif a != b and path not in RESUMABLE_CHANGES:
            changes.append(f"{path}: {a!r} -> {b!r}")
    return changes


def feature_with_defaults(recorded: Dict[str, Any]) -> Dict[str, Any]:
    """
    A feature as a preparation recorded it (schema.json), with every FeatureConfig key: one the
    record lacks, written before the key existed, at its default, which is what it was then.

    Args:
        recorded (Dict[str, Any]): a recorded feature's keys (``name`` at least).

    Returns:
        Dict[str, Any]: every FeatureConfig key, the record's values where it has them.

    Example::

        >>> feature_with_defaults({"name": "genres", "kind": "multi_hot"})["max_items"]
        0
    """
    return {**dataclasses.asdict(FeatureConfig(recorded["name"])), **recorded}


def history_length(features: List[FeatureConfig]) -> int:
    """
    The longest history window (history and history_mean features): the earlier views per
    user a preparation keeps for the next window (engagerec.data.growth) and a raw program's
    client gives (engagerec.export). 0 without history features.

    Args:
        features (List[FeatureConfig]): ``data.features``.

    Returns:
        int: the longest ``length``.

    Example::

        >>> from engagerec.config import FeatureConfig
        >>> history_length([FeatureConfig("h", kind="history", of="content_id", length=20),
        ...                 FeatureConfig("r", kind="history_mean", of="skip", length=200)])
        200
    """
    return max((f.length for f in features if f.kind in ("history", "history_mean")), default=0)


def prepared_dir(cfg: ExperimentConfig) -> str:
    """Where the run reads its prepared data: ``train.data_dir``, else ``prepared/<name>``
    (where ``engagerec prepare`` writes by default)."""
    return cfg.train.data_dir or f"prepared/{cfg.name}"


def with_tower(cfg: ExperimentConfig, tower: str, **train_changes: Any) -> ExperimentConfig:
    """``cfg`` with another tower (its params kept only if it is the configured tower) and
    optional changes to ``train``; the original is left as it is."""
    params = cfg.model.tower.params if tower == cfg.model.tower.name else {}
    model = dataclasses.replace(cfg.model, tower=TowerConfig(name=tower, params=dict(params)))
    return dataclasses.replace(cfg, model=model, train=dataclasses.replace(cfg.train, **train_changes))


# ----------------------------------------------------------------- cross-key checks

# What evaluation reports for each task kind (engagerec.evaluate; a test holds the two
# together) and which way each improves: what train.monitor may name. Baselines and
# calibration are reported, not monitored: they do not improve in one direction.
TASK_METRICS: Dict[str, Dict[str, Optional[str]]] = {
    "regression": {"mse": "min", "rmse": "min", "mae": "min", "mse_loss": "min", "xauc": "max",
                   "baseline_mse_train_mean": None},
    "binary": {"auc": "max", "accuracy": "max", "ne": "min", "log_loss": "min", "calibration": None,
               "baseline_accuracy_majority": None,
               "gauc": "max"},  # when the data embeds train.gauc_group (evaluate)
}  # fmt: skip


def check_monitor(monitor: str, mode: str, tasks: Optional[Dict[str, str]] = None) -> None:
    """
    Check that ``train.monitor`` names a metric that evaluation reports and that
    ``train.monitor_mode`` follows its direction, before any training is spent on it.

    Args:
        monitor (str): ``loss`` (the weighted sum of the task losses) or ``<task>/<metric>``.
        mode (str): ``min`` or ``max``.
        tasks (Optional[Dict[str, str]]): task name -> kind; ``None`` when the tasks are not
            known yet (taken from the prepared data's labels): only the metric is checked.

    Raises:
        ConfigError: naming what train.monitor may be, or the mode it needs.

    Example::

        >>> from engagerec.config import check_monitor
        >>> check_monitor("skip/auc", "max", {"watch_ratio": "regression", "skip": "binary"})
        >>> check_monitor("skip/auc", "min")
        Traceback (most recent call last):
          ...
        engagerec.errors.ConfigError: train.monitor 'skip/auc' improves upward: set train.monitor_mode: max
    """
    if monitor == "loss":
        direction: Optional[str] = "min"
    else:
        task, _, metric = monitor.rpartition("/")
        if tasks is None:
            kinds = [kind for kind, metrics in TASK_METRICS.items() if metric in metrics]
        else:
            kinds = [tasks[task]] if task in tasks and metric in TASK_METRICS[tasks[task]] else []
        if not task or not kinds or TASK_METRICS[kinds[0]][metric] is None:
            by_kind = {
                kind: [m for m, way in metrics.items() if way] for kind, metrics in TASK_METRICS.items()
            }
            if tasks is None:
                choices = "; ".join(f"<{kind} task>/{'|'.join(ms)}" for kind, ms in by_kind.items())
            else:
                choices = ", ".join(f"{name}/{m}" for name, kind in tasks.items() for m in by_kind[kind])
            raise ConfigError(
                f"train.monitor '{monitor}' is not a metric that evaluation reports and that improves "
                f"one way; expected loss or one of {choices}"
            )
        direction = TASK_METRICS[kinds[0]][metric]
    if mode != direction:
        way = "upward" if direction == "max" else "downward"
        raise ConfigError(f"train.monitor '{monitor}' improves {way}: set train.monitor_mode: {direction}")


def check_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The checks that span several keys, run when a config loads (returns ``cfg``)."""
    tc = cfg.train
    if not 1 <= tc.train_metrics_every_steps <= tc.log_every_steps:
        raise ConfigError(
            f"train.train_metrics_every_steps {tc.train_metrics_every_steps}, expected 1 to "
            f"train.log_every_steps ({tc.log_every_steps}): each logged window needs batches"
        )
    if not tc.embedding_l2 >= 0:
        raise ConfigError(f"train.embedding_l2 {tc.embedding_l2}, expected 0 or more")
    if not 0 <= tc.lr_final <= 1:
        raise ConfigError(f"train.lr_final {tc.lr_final}, expected 0 to 1 (a fraction of each learning rate)")
    if tc.lr_schedule == "constant" and tc.lr_final != 0:  # a forgotten schedule, not a choice
        raise ConfigError(
            f"train.lr_final {tc.lr_final} decays nothing under train.lr_schedule: constant "
            "(set lr_schedule: linear or cosine)"
        )
    tasks = {t.name: t.kind for t in cfg.model.tasks} or None  # none named: the data's labels
    check_monitor(tc.monitor, tc.monitor_mode, tasks)
    return cfg


# ---------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


# a number in exponent form that YAML 1.1 leaves a string: no dot (1e-3) or no exponent sign (1.5e3)
_YAML11_EXPONENT = re.compile(r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], path)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return _build(tp, value, path)
    if origin in (list, List):
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        key_tp, val_tp = typing.get_args(tp)
        return {_coerce(k, key_tp, path): _coerce(v, val_tp, f"{path}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if origin is Literal:  # an enum-like key: checked when the config loads, not when it is used
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{path}: expected one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _YAML11_EXPONENT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 (PyYAML) reads 1e-3 and 1.5e3 as strings: it wants 1.0e-3
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    return value


def _build(cls: Any, data: Dict[str, Any], path: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{near[0]}'?" if near else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key '{where}'{hint}")
        kwargs[key] = _coerce(value, hints[key], where)
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field is missing
        raise ConfigError(f"{path or 'config'}: {err}") from None


def apply_override(raw: Dict[str, Any], assignment: str) -> None:
    """Apply one ``a.b.c=value`` override (value parsed as YAML) to a raw mapping.

    In a list, a number is an index and any other word the name of an entry (lists of named
    entries: data.features, data.labels, model.tasks), e.g. ``data.labels.1.threshold=0.3`` or
    ``data.features.history.positions=true``.

    Args:
        raw: a config's raw mapping (changed in place).
        assignment: ``dotted.key=value``.

    Raises:
        ConfigError: no ``=``, an index past the list's end, a name no entry has (the nearest
            named), or a key under a value that is neither a mapping nor a list.

    Example::

        >>> from engagerec.config import apply_override
        >>> raw = {"data": {"features": [{"name": "age"}, {"name": "history", "kind": "history"}]}}
        >>> apply_override(raw, "data.features.history.positions=true")
        >>> raw["data"]["features"][1]
        {'name': 'history', 'kind': 'history', 'positions': True}
    """
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r}: expected key=value")
    key, text = assignment.split("=", 1)
    node: Any = raw
    parts = key.strip().split(".")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            index: Any = _list_index(node, part, assignment)
        elif isinstance(node, dict):
            index = part
            if not last:
                node.setdefault(part, {})
        else:
            raise ConfigError(f"override {assignment!r}: '{parts[i - 1]}' is not a mapping or a list")
        if last:
            node[index] = yaml.safe_load(text)
        else:
            node = node[index]


def _list_index(node: List[Any], part: str, assignment: str) -> int:
    """The position in ``node`` that an override's ``part`` names: an index, or the name of an
    entry (a mapping with that ``name``)."""
    if part.isdigit():
        if int(part) >= len(node):
            raise ConfigError(f"override {assignment!r}: '{part}' is not an index of a {len(node)}-item list")
        return int(part)
    names = [entry.get("name") for entry in node if isinstance(entry, dict)]
    matches = [i for i, entry in enumerate(node) if isinstance(entry, dict) and entry.get("name") == part]
    if len(matches) != 1:
        found = "no entry" if not matches else "several entries"
        raise ConfigError(
            f"override {assignment!r}: {found} of the {len(node)}-item list is named '{part}'"
            + _nearest(part, [n for n in names if n is not None])
        )
    return matches[0]


# ------------------------------------------------------------ base: inheritance
# A config file may start with ``base: other.yaml``; its keys then change the base's:
# mappings merge key by key, lists of named entries (mappings with a ``name``: data.features,
# data.labels, model.tasks) merge by name, other values replace. Entries are addressed by name
# so that a derived file states only its differences, whatever the base's order.
DROP = "drop"  # {name: x, drop: true} in a derived list removes the base's entry x
REPLACE = "replace"  # replace: [dotted.key, ...] in a derived file: those values replace, unmerged


def _is_named_list(value: Any) -> bool:
    """A non-empty list whose every entry is a mapping with a ``name``."""
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) and "name" in v for v in value)


def _nearest(word: str, choices: List[str]) -> str:
    """'; did you mean X?' for the closest of ``choices``, else ''."""
    near = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f"; did you mean '{near[0]}'?" if near else ""


def merge_named(base: List[Dict[str, Any]], derived: List[Dict[str, Any]], path: str) -> List[Dict[str, Any]]:
    """
    Merge a derived config's list of named entries into its base's list, by name.

    An entry whose name the base lists updates that entry where it stands (its keys merged
    into the base entry's, recursively); a new name is appended, in the derived list's order;
    ``{name: x, drop: true}`` removes the base's entry ``x``.

    Args:
        base (List[Dict[str, Any]]): the base's entries (raw mappings), in order.
        derived (List[Dict[str, Any]]): the derived file's entries, each with a ``name``.
        path (str): the dotted key of the list, for messages (e.g. ``data.features``).

    Returns:
        List[Dict[str, Any]]: a new list; neither argument is changed.

    Raises:
        ConfigError: a name listed twice in ``derived`` (or twice in ``base`` and addressed), a
            ``drop`` of a name the base does not list, or a ``drop`` entry with other keys.

    Example::

        >>> from engagerec.config import merge_named
        >>> base = [{"name": "a", "kind": "numeric"}, {"name": "b"}, {"name": "c"}]
        >>> merge_named(base, [{"name": "a", "buckets": 8}, {"name": "b", "drop": True}, {"name": "d"}], "f")
        [{'name': 'a', 'kind': 'numeric', 'buckets': 8}, {'name': 'c'}, {'name': 'd'}]
    """
    out = [dict(entry) for entry in base]
    names = [entry.get("name") for entry in out]
    seen = set()
    for entry in derived:
        name = entry["name"]
        if name in seen:
            raise ConfigError(f"{path}: '{name}' is listed twice; give each name one entry")
        seen.add(name)
        if names.count(name) > 1:
            raise ConfigError(f"{path}: the base lists '{name}' twice, so which entry to change is unclear")
        if DROP in entry:
            if entry[DROP] is not True or set(entry) != {"name", DROP}:
                raise ConfigError(f"{path}: '{name}': a drop entry is exactly {{name: {name}, drop: true}}")
            if name not in names:
                raise ConfigError(
                    f"{path}: drops '{name}', which the base does not list{_nearest(name, names)}"
                )
            del out[names.index(name)]
            names.remove(name)
        elif name in names:
            i = names.index(name)
            out[i] = merge_raw(out[i], entry, f"{path}.{name}")
        else:
            out.append(dict(entry))
            names.append(name)
    return out


def merge_raw(base: Dict[str, Any], derived: Dict[str, Any], path: str = "") -> Dict[str, Any]:
    """
    A derived config's raw mapping merged into its base's (``base:`` inheritance).

    Mappings merge key by key; lists of named entries merge by name (``merge_named``); any
    other value in ``derived`` (a number, a string, a plain list) replaces the base's.

    Args:
        base (Dict[str, Any]): the base's raw mapping (its own base already merged in).
        derived (Dict[str, Any]): the derived file's raw mapping, ``base`` and ``replace`` removed.
        path (str): the dotted key of these mappings, for messages. Default: ``""``.

    Returns:
        Dict[str, Any]: a new mapping; neither argument is changed.

    Raises:
        ConfigError: as ``merge_named``; or an empty list where the base has named entries
            (it would change nothing: name the key under ``replace:`` to empty it).

    Example::

        >>> from engagerec.config import merge_raw
        >>> base = {"train": {"epochs": 5, "batch_size": 256}, "tags": [1, 2]}
        >>> merge_raw(base, {"train": {"epochs": 1}, "tags": [3]})
        {'train': {'epochs': 1, 'batch_size': 256}, 'tags': [3]}
    """
    out = dict(base)
    for key, value in derived.items():
        where = f"{path}.{key}" if path else str(key)
        old = out.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            out[key] = merge_raw(old, value, where)
        elif _is_named_list(old) and (value == [] or _is_named_list(value)):
            if not value:
                raise ConfigError(
                    f"{where}: an empty list changes none of the base's named entries; to empty "
                    f"the list, add '{where}' to the file's {REPLACE}: list"
                )
            out[key] = merge_named(old, value, where)
        elif _is_named_list(value) and old in (None, []):
            out[key] = merge_named([], value, where)  # the base lists none: checks the entries
        else:
            out[key] = value
    return out


def _without(raw: Dict[str, Any], dotted: str) -> Dict[str, Any]:
    """``raw`` (a base's mapping) with the value at ``dotted`` removed, so that the derived
    file's value replaces it rather than merging into it (``replace:``)."""
    *parents, last = dotted.split(".")
    out = dict(raw)
    node = out
    for part in parents:
        if not isinstance(node.get(part), dict):
            return out  # the base does not set it: nothing to replace
        node[part] = dict(node[part])
        node = node[part]
    node.pop(last, None)
    return out


def _replaced_keys(raw: Dict[str, Any], path: Path) -> List[str]:
    """The file's ``replace:`` list, checked: dotted keys this file sets."""
    keys = raw.pop(REPLACE, [])
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise ConfigError(f"{path}: {REPLACE}: expected a list of dotted keys, got {keys!r}")
    for key in keys:
        node: Any = raw
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"{path}: {REPLACE} names '{key}', which this file does not set")
            node = node[part]
    return keys


def _read_raw(path: Path) -> Dict[str, Any]:
    """The file's mapping; ``base: other.yaml`` (relative to the file) is read first and the
    file's keys merged into it (``merge_raw``), except those its ``replace:`` names."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    base = raw.pop("base", None)
    replaced = _replaced_keys(raw, path)
    if not base:
        if replaced:
            raise ConfigError(f"{path}: {REPLACE}: replaces a base's values, but the file has no base:")
        return raw
    inherited = _read_raw(path.parent / base)
    for key in replaced:
        inherited = _without(inherited, key)
    try:
        return merge_raw(inherited, raw)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


BUNDLED_CONFIGS = Path(__file__).resolve().parent / "configs"  # shipped in the wheel


def resolve_config_path(path: str | Path) -> Path:
    """``path`` as given, or, for a bare name such as ``kuairand_mmoe``, the config shipped with
    engagerec (``engagerec/configs/kuairand_mmoe.yaml``)."""
    path = Path(path)
    if path.is_file() or path.parent != Path("."):
        return path
    bundled = BUNDLED_CONFIGS / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
    return bundled if bundled.is_file() else path


def load_config(path: str | Path, overrides: Optional[List[str]] = None) -> ExperimentConfig:
    """Read a YAML experiment file strictly; ``overrides`` are ``key=value`` strings.

    Args:
        path: a YAML file, or the bare name of a config shipped with engagerec
            (``kuairand_mmoe``; see ``engagerec/configs/``).
        overrides: ``a.b.c=value`` strings (values parsed as YAML; a number indexes a list).

    Example::

        >>> cfg = load_config("kuairand_mmoe", ["train.epochs=1"])
        >>> cfg.model.tower.name, cfg.train.epochs
        ('mmoe', 1)
    """
    path = resolve_config_path(path)
    raw = _read_raw(path)
    for assignment in overrides or []:
        apply_override(raw, assignment)
    try:
        return check_config(_build(ExperimentConfig, raw, ""))
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def config_from_dict(raw: Dict[str, Any], check: bool = True) -> ExperimentConfig:
    """Type a raw mapping (e.g. a run's config.json) with the same strict checks as ``load_config``;
    ``check=False`` leaves out the cross-key checks (a finished run written by an older release)."""
    cfg = _build(ExperimentConfig, raw, "")
    return check_config(cfg) if check else cfg


def normalised_config(raw: Dict[str, Any]) -> Dict[str, Any]:
    """A raw config (``dataclasses.asdict``) with every key this release knows, defaults filled:
    what a resume compares against, so a key added since the checkpoint is not a change."""
    return dataclasses.asdict(config_from_dict(raw, check=False))
