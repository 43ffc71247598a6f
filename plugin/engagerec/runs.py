"""Runs from configs and run directories: the one place where a config becomes objects.

Building the sharded model a config describes (training and every reopened run use it),
opening a trained run (its config, the sharded model with a checkpoint loaded, on this process
group: what evaluate, predict and export start from), evaluating it, reading its outputs on a
split, and describing a config's models. The modules below it (distributed, evaluate, model)
take objects; the study (``engagerec_study.compare``) trains towers x seeds on top of
it; cli.py only parses arguments."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import numpy as np
import torch
from torchrec.distributed.model_parallel import DistributedModelParallel

from engagerec import checkpoint
from engagerec.config import ExperimentConfig, config_from_dict, prepared_dir, with_tower
from engagerec.data.reader import ShardReader, make_loader
from engagerec.data.schema import DatasetSchema
from engagerec.describe import format_parameter_table, parameter_counts
from engagerec.distributed import (
    CPU_SPARSE_OPTIMIZERS,
    CUDA_ONLY_SHARDING,
    Runtime,
    any_rank,
    close_runtime,
    init_runtime,
    shard_model,
)
from engagerec.embedding_backward import loop_tables, uses_loop
from engagerec.errors import CheckpointError, ConfigError
from engagerec.evaluate import evaluate, train_label_means
from engagerec.features import FeatureSpec
from engagerec.machine import cpu_has_bf16_matmuls
from engagerec.model import MultiTaskModel
from engagerec.model_builder import build_model
from engagerec.towers import TOWERS


def tower_autocast(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """
    The dtype a ``train.tower_precision`` setting trains the tower in on ``device``
    (``MultiTaskModel.train_autocast``): ``"bf16"`` always bf16; ``"auto"`` bf16 where the device
    multiplies bf16 natively (a CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX), where it
    costs about half of float32's matmul time, and float32 elsewhere, where emulated bf16 would
    be slower; ``"fp32"`` float32.

    Args:
        precision (str): ``"fp32"``, ``"bf16"`` or ``"auto"``.
        device (torch.device): where the model trains.

    Returns:
        Optional[torch.dtype]: ``torch.bfloat16``, or None for float32 throughout.

    Example::

        >>> import torch
        >>> from engagerec.runs import tower_autocast
        >>> tower_autocast("bf16", torch.device("cpu")), tower_autocast("fp32", torch.device("cpu"))
        (torch.bfloat16, None)
        >>> from engagerec.machine import cpu_has_bf16_matmuls
        >>> picked = tower_autocast("auto", torch.device("cpu"))  # by this CPU's flags
        >>> picked == (torch.bfloat16 if cpu_has_bf16_matmuls() else None)
        True
    """
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        return None
    if device.type == "cuda":  # Ampere (compute capability 8) and later; older cards emulate bf16
        native = torch.cuda.get_device_capability(device)[0] >= 8
    else:
        native = device.type == "cpu" and cpu_has_bf16_matmuls()
    return torch.bfloat16 if native else None


def sharded_model(
    cfg: ExperimentConfig, runtime: Runtime, training: bool = True
) -> "tuple[DistributedModelParallel, MultiTaskModel]":
    """The configured model, built on the meta device for the prepared data and sharded; the
    planner gets the training batch size, so a run's plan is the same wherever it is rebuilt
    on the same world size (training, evaluation).

    Args:
        cfg: the experiment; its prepared data (``prepared_dir(cfg)``) must exist.
        runtime: this process's group and device (``distributed.init_runtime``).
        training: whether it will train: only then may ``train.embedding_backward`` add
            companion features (``resolve_loop_backward``), as they serve the backward only;
            a model opened to evaluate or score reads plain batches. Default: True.

    Returns:
        (the DistributedModelParallel, the MultiTaskModel it wraps).

    Example::

        >>> import contextlib, io, tempfile
        >>> from engagerec.config import load_config
        >>> from engagerec.data.prepare import prepare
        >>> from engagerec.distributed import close_runtime, init_runtime
        >>> cfg = load_config("synthetic_study", ["data.source.synthetic.num_rows=2000",
        ...                                       f"train.data_dir={tempfile.mkdtemp()}"])
        >>> _ = prepare(cfg.data, cfg.train.data_dir)
        >>> runtime = init_runtime("cpu")
        >>> with contextlib.redirect_stdout(io.StringIO()):
        ...     dmp, model = sharded_model(cfg, runtime)
        >>> type(dmp).__name__, model.tower.__class__.__name__
        ('DistributedModelParallel', 'MMoE')
        >>> close_runtime(runtime)
    """
    schema = DatasetSchema.load(prepared_dir(cfg))
    tc = cfg.train
    loop = training and resolve_loop_backward(cfg, schema, runtime)
    model = build_model(schema, cfg.model, device=torch.device("meta"), loop_backward=loop)
    model.train_autocast = tower_autocast(tc.tower_precision, runtime.device)
    model.embedding_l2 = tc.embedding_l2  # check_config refused a negative one
    return shard_model(model, runtime, tc.batch_size, tc.sharding, tc.sparse_optimizer, tc.sparse_lr), model


def resolve_loop_backward(cfg: ExperimentConfig, schema: DatasetSchema, runtime: Runtime) -> bool:
    """
    Whether ``cfg``'s model trains with ``build_model(loop_backward=True)`` here: some table is
    concerned (``loop_tables`` would change it; a schema with a managed id space keeps every
    table as built) and ``train.embedding_backward`` picks the loop on this device
    (``uses_loop``), as rank 0 decides: under ``auto`` only rank 0 times the two paths, and every
    rank builds the same tables. With no table concerned nothing is timed, and no collective
    runs (every rank knows that from the schema).

    Args:
        cfg (ExperimentConfig): the experiment.
        schema (DatasetSchema): its prepared data's schema.
        runtime (Runtime): this process's group and device.

    Returns:
        bool: the same on every rank.

    Example::

        >>> import torch
        >>> from engagerec.config import load_config
        >>> from engagerec.data.schema import DatasetSchema, LabelSpec, SparseFeature
        >>> from engagerec.distributed import Runtime
        >>> from engagerec.runs import resolve_loop_backward
        >>> item = SparseFeature("item", "item", multi=False)
        >>> schema = DatasetSchema(features=[], sparse=[item], dense=[], labels=[LabelSpec("skip", "binary")],
        ...                        vocab_sizes={"item": 10**6})
        >>> cfg = load_config("kuairand_mmoe", ["train.embedding_backward=loop"])
        >>> resolve_loop_backward(cfg, schema, Runtime(0, 1, torch.device("cpu"), owns_group=False))
        True
    """
    tables = FeatureSpec.from_schema(schema, cfg.model.embeddings).tables
    if schema.managed or loop_tables(tables) == tables:
        return False
    return any_rank(runtime.rank == 0 and uses_loop(cfg.train.embedding_backward, runtime.device))


@dataclass
class OpenedRun:
    """A run's config (made CPU-ready when opened on CPU), its prepared data directory, the
    process group, the sharded model with the checkpoint's weights, and that checkpoint."""

    cfg: ExperimentConfig
    data_dir: str
    runtime: Runtime
    dmp: DistributedModelParallel
    model: MultiTaskModel
    checkpoint: Path


def seed_run_dir(root: str | Path, tower: str, seed: int) -> Path:
    """Where the run of ``tower`` with ``seed`` lives under ``root``: ``<root>/<tower>/seed<seed>``,
    the one layout of runs: ``engagerec train``'s default (root ``runs/<name>``), a comparison's
    runs and the RESULTS sections' read it here.

    Args:
        root: the directory holding the runs (``runs/<name>``, a comparison's output).
        tower: the tower's name (or the name of any variant trained with several seeds).
        seed: the run's seed.

    Example::

        >>> seed_run_dir("runs/kuairand_stats", "mmoe", 3).as_posix()
        'runs/kuairand_stats/mmoe/seed3'
    """
    return Path(root) / tower / f"seed{seed}"


def run_config(run_dir: str | Path) -> ExperimentConfig:
    """The config a run was trained with (its config.json).

    Raises:
        CheckpointError: ``run_dir`` has no config.json (it is no run directory).
    """
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(
            f"{run_dir} is no run directory: it has no config.json (written by `engagerec train`)"
        )
    return config_from_dict(json.loads(path.read_text()), check=False)  # as it was trained


def for_cpu(cfg: ExperimentConfig) -> ExperimentConfig:
    """A GPU run's config for use on CPU: a run opened for inference loads no optimiser state
    and any sharding reshards, so a CUDA-only sparse optimiser or sharding type is swapped for
    CPU ones."""
    train = cfg.train
    optimizer = (
        train.sparse_optimizer if train.sparse_optimizer in CPU_SPARSE_OPTIMIZERS else "rowwise_adagrad"
    )
    sharding = {k: [t for t in v if t not in CUDA_ONLY_SHARDING] for k, v in train.sharding.items()}
    sharding = {k: v for k, v in sharding.items() if v}
    return dataclasses.replace(
        cfg, train=dataclasses.replace(train, sparse_optimizer=optimizer, sharding=sharding)
    )


@contextlib.contextmanager
def open_run(
    run_dir: str | Path, checkpoint_name: str = "best", device: Optional[str] = None
) -> Iterator[OpenedRun]:
    """Open a finished (or interrupted) run on however many ranks this process group has.

    Args:
        run_dir: a directory written by ``engagerec train``.
        checkpoint_name: "best" (the best validation epoch) or "latest" (the newest step).
        device: "cpu", "cuda" or "auto"; default the run's ``train.device`` (``cpu`` opens a
            GPU-trained run on CPU).

    Yields:
        OpenedRun, in eval mode; the process group is closed on exit.

    Raises:
        CheckpointError: no run directory, or no checkpoint of that kind that checks out.
    """
    cfg = run_config(run_dir)
    runtime = init_runtime(device or cfg.train.device)
    try:
        if runtime.device.type == "cpu":
            cfg = for_cpu(cfg)
        dmp, model = sharded_model(cfg, runtime, training=False)
        pattern = checkpoint.BEST_PATTERN if checkpoint_name == "best" else checkpoint.STEP_PATTERN
        root = Path(run_dir) / "checkpoints"
        path = checkpoint.latest(root, pattern)
        if path is None:
            raise CheckpointError(f"no {checkpoint_name} checkpoint under {root}")
        checkpoint.load(path, dmp, restore_rng=False, checked=True)  # latest has just verified it
        dmp.eval()
        yield OpenedRun(cfg, prepared_dir(cfg), runtime, dmp, model, path)
    finally:
        close_runtime(runtime)


def evaluate_run(
    run_dir: str | Path, split: str = "test", checkpoint_name: str = "best", device: Optional[str] = None
) -> Dict[str, float]:
    """Evaluate a finished (or interrupted) run's checkpoint on a split, on however many ranks
    this process group has.

    Args:
        run_dir: a directory written by ``engagerec train``.
        split: "train", "val" or "test".
        checkpoint_name: "best" (the best validation epoch) or "latest" (the newest step).
        device: default the run's ``train.device``; ``cpu`` evaluates a GPU-trained run on CPU.

    Returns:
        Dict[str, float]: the metrics ``train`` reports for a split (e.g. ``skip/auc``).

    Example: ``tests/test_train.py::test_evaluate_run_reproduces_the_final_test_metrics``
    (a trained run is needed; ``split_outputs`` below shows one).
    """
    with open_run(run_dir, checkpoint_name, device) as run:
        means = train_label_means(run.data_dir, [t.label for t in run.model.tasks])
        metrics = evaluate(
            run.dmp,
            run.model.tasks,
            run.data_dir,
            split,
            run.cfg.train.eval_batch_size,
            run.runtime.device,
            means,
            gauc_group=run.cfg.train.gauc_group,
        )
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # every rank done before any tears the group down
        return metrics


@dataclass
class SplitOutputs:
    """What a model says about every row of a split: per task its predictions (probabilities
    for binary tasks), labels and label weights (0 where the label is missing), each [N]; and
    per gate of the tower (``gate_weights``, e.g. MMoE's ``"task0"``, PLE's
    ``"level0/task1"``) the mean weight of each expert [E] and the mean per-row entropy in
    nats (0: one expert; log E: all alike)."""

    predictions: Dict[str, np.ndarray]
    labels: Dict[str, np.ndarray]
    weights: Dict[str, np.ndarray]
    gate_means: Dict[str, np.ndarray] = field(default_factory=dict)
    gate_entropy: Dict[str, float] = field(default_factory=dict)


def split_outputs(run_dir: str | Path, split: str = "test", checkpoint_name: str = "best") -> SplitOutputs:
    """
    Every row of ``split`` through a run's best checkpoint on one CPU process: the predictions
    beside the labels (for metrics evaluate does not compute, e.g. a skip read off the
    watch-ratio head) and the tower's gates, averaged over the rows.

    Args:
        run_dir: a directory written by ``engagerec train``.
        split: "train", "val" or "test".
        checkpoint_name: "best" or "latest" (see ``runs.open_run``).

    Returns:
        SplitOutputs, rows in the split's stored order.

    Example::

        >>> import contextlib, io, tempfile
        >>> from engagerec.config import load_config
        >>> from engagerec.data.prepare import prepare
        >>> from engagerec.train import train
        >>> cfg = load_config("synthetic_study", [
        ...     "data.source.synthetic.num_rows=3000", f"train.data_dir={tempfile.mkdtemp()}",
        ...     "train.epochs=1", "train.progress_bar=false"])
        >>> _ = prepare(cfg.data, cfg.train.data_dir)
        >>> run = tempfile.mkdtemp()
        >>> with contextlib.redirect_stdout(io.StringIO()):  # the sharding plan, the epoch line
        ...     _ = train(cfg, run)
        >>> out = split_outputs(run, "test")
        >>> sorted(out.predictions), out.predictions["skip"].shape == out.labels["skip"].shape
        (['skip', 'watch_ratio'], True)
        >>> gates = out.gate_means["task1"]  # MMoE's skip gate over its 4 experts
        >>> gates.shape, round(float(gates.sum()), 4)
        ((4,), 1.0)
    """
    outputs: Dict[str, Dict[str, List[np.ndarray]]] = {"predictions": {}, "labels": {}, "weights": {}}
    gate_sums: Dict[str, torch.Tensor] = {}
    entropy_sums: Dict[str, float] = {}
    rows = 0
    with open_run(run_dir, checkpoint_name, device="cpu") as run:
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            raise ValueError("split_outputs runs on one process (it returns every row of the split)")
        reader = ShardReader(run.data_dir, split, batch_size=run.cfg.train.eval_batch_size)
        gates = getattr(run.model.tower, "gate_weights", None)
        with torch.no_grad():
            for batch in make_loader(reader, num_workers=0, pin_memory=False):
                _, (_, predictions, labels, weights) = run.dmp(batch)
                for key, values in (("predictions", predictions), ("labels", labels), ("weights", weights)):
                    for task, tensor in values.items():
                        outputs[key].setdefault(task, []).append(tensor.reshape(-1).double().numpy())
                rows += len(batch.labels[run.model.tasks[0].label])
                for name, weight in (gates or {}).items():
                    weight = weight.double()
                    gate_sums[name] = gate_sums.get(name, 0) + weight.sum(dim=0)
                    row_entropy = -(weight * weight.clamp_min(1e-12).log()).sum(dim=1)
                    entropy_sums[name] = entropy_sums.get(name, 0.0) + float(row_entropy.sum())
    joined = {key: {t: np.concatenate(parts) for t, parts in v.items()} for key, v in outputs.items()}
    return SplitOutputs(
        **joined,
        gate_means={name: (total / rows).numpy() for name, total in gate_sums.items()},
        gate_entropy={name: total / rows for name, total in entropy_sums.items()},
    )


def describe(cfg: ExperimentConfig, towers: List[str], data_dir: Optional[str] = None) -> str:
    """Parameter counts per part (each table, the input arch, the tower, each head) of ``cfg``'s
    model with each of ``towers``, as a table with a heading line (``engagerec describe``).

    Args:
        cfg: the experiment; its prepared data must exist (``data_dir``, else ``prepared_dir(cfg)``).
        towers: tower names, or ``["all"]`` for every registered tower.
        data_dir: the prepared data directory.

    Raises:
        ConfigError: no tower named.

    Example::

        >>> import tempfile
        >>> from engagerec.config import load_config
        >>> from engagerec.data.prepare import prepare
        >>> cfg = load_config("synthetic_study", ["data.source.synthetic.num_rows=2000"])
        >>> data = tempfile.mkdtemp()
        >>> _ = prepare(cfg.data, data)
        >>> print(describe(cfg, ["mmoe", "ple"], data).splitlines()[2])
        |---|---:|---:|
    """
    schema = DatasetSchema.load(data_dir or prepared_dir(cfg))
    names = sorted(TOWERS) if towers == ["all"] else towers
    if not names:
        raise ConfigError("describe needs at least one tower name")
    rows = {}
    for name in names:
        model = build_model(schema, with_tower(cfg, name).model)
        rows[name] = parameter_counts(model)
    sparse = model.input_arch.output_dim if model.input_arch is not None else model.sparse_dim
    through = " through the input arch" if model.input_arch is not None else ""
    heading = (
        f"parameters per part ({sparse + model.dense_in_features} tower inputs: {sparse} from the pooled "
        f"embeddings{through} + {model.dense_in_features} dense)"
    )
    return heading + "\n" + format_parameter_table(rows)
