"""Where a training step's time goes: torch.profiler over a window of `engagerec train`'s own
steps, summed into the parts a recommender engineer tunes separately.

``train.profile_steps: N`` profiles steps ``profile_start_step + 1 .. + N`` of the run (after
warm-up) and writes, in the run directory, ``profile.json`` (the breakdown below),
``profile_ops.txt`` (torch.profiler's table of the costliest operators) and
``profile_trace.json`` (a Chrome / Perfetto trace).

The parts, in milliseconds per step, come from TorchRec's own ``record_function`` scopes
(``## start_sparse_data_dist ##``, ``[lookup]_...``, ``## backward ##``, ``## optimizer ##``), FBGEMM's
kernels, and scopes this module adds around the reader, the tower, the heads and the metrics.
What no scope covers is reported as ``other`` so the parts add up to the measured step. With the
fused tables' backward on a worker thread (train.embedding_backward_thread), the main thread's
wait for it is ``embedding_backward_wait``, and the worker's own time, beside the step and
outside its sum, ``embedding_backward_on_worker``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import torch
from torch import nn
from torch.autograd.profiler import record_function

READ = "engagerec:read_batch"
TOWER = "engagerec:tower"
HEADS = "engagerec:heads"
METRICS = "engagerec:train_metrics"
WAIT = "engagerec:wait_embedding_backward"  # engagerec.backward_overlap's waits for its worker

# part -> how its time is found: (event-name prefix, whether self time is summed instead of total)
PARTS = {
    "reader": (READ, False),
    "input_dist": ("## start_sparse_data_dist", False),
    "input_dist_wait": ("## wait_sparse_data_dist", False),
    "embedding_lookup": ("[lookup]_", False),
    "tower_forward": (TOWER, False),
    "heads_forward": (HEADS, False),
    "embedding_backward_and_fused_optimizer": ("fbgemm::split_embedding_backward_codegen", True),
    "backward_all": ("## backward", False),
    "dense_optimizer": ("## optimizer", False),
    "train_metrics": (METRICS, False),
    "embedding_backward_wait": (WAIT, False),
}


def labelled_batches(batches: Iterator) -> Iterator:
    """
    ``batches`` with each ``next`` inside a ``record_function`` scope, so the reader's share of
    a step shows in a profile (the scope costs nothing measurable when no profiler runs).

    Args:
        batches (Iterator): the loader's iterator.

    Returns:
        Iterator: the same items.

    Example::

        >>> from engagerec.profiling import labelled_batches
        >>> list(labelled_batches(iter([1, 2])))
        [1, 2]
    """
    while True:
        with record_function(READ):
            try:
                item = next(batches)
            except StopIteration:
                return
        yield item


def label_modules(model: nn.Module) -> Callable[[], None]:
    """
    Scope the tower's and the heads' forwards (``MultiTaskModel.tower`` and ``.heads``) by
    forward hooks, so a profile separates them; the hooks run eagerly, outside FX tracing.

    Args:
        model (nn.Module): a MultiTaskModel (not its DMP wrapper).

    Returns:
        Callable[[], None]: removes the hooks.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from engagerec.profiling import label_modules
        >>> model = nn.Module()
        >>> model.tower, model.heads = nn.Linear(2, 2), nn.ModuleList([nn.Linear(2, 1)])
        >>> remove = label_modules(model)
        >>> with torch.profiler.profile() as prof:
        ...     _ = model.heads[0](model.tower(torch.ones(1, 2)))
        >>> remove()
        >>> sorted({e.key for e in prof.key_averages() if e.key.startswith("engagerec:")})
        ['engagerec:heads', 'engagerec:tower']
    """
    handles = []
    for name, modules in ((TOWER, [model.tower]), (HEADS, list(model.heads))):
        for module in modules:
            scopes: List[record_function] = []

            def enter(_module, _inputs, name=name, scopes=scopes):
                scopes.append(record_function(name))
                scopes[-1].__enter__()

            def leave(_module, _inputs, _output, scopes=scopes):
                scopes.pop().__exit__(None, None, None)

            handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]

    def remove() -> None:
        for handle in handles:
            handle.remove()

    return remove


def breakdown(
    profiler: torch.profiler.profile, steps: int, wall_seconds: float, worker_seconds: float = 0.0
) -> Dict[str, float]:
    """
    The profiled window's time per step, in milliseconds, by part (see the module docstring).

    ``backward_dense`` is TorchRec's backward scope less FBGEMM's embedding backward (which
    applies the fused optimiser); ``other`` is the step less every part (the pipeline's own
    work, Python, waits). With the fused tables' backward on a worker thread
    (engagerec.backward_overlap), the profiler sees only the main thread:
    ``embedding_backward_wait`` is the main thread's wait for the worker (taken out of
    ``embedding_lookup``, whose lookups wait), and ``embedding_backward_on_worker`` the worker's
    own time, which runs beside the step and is not part of its sum.

    Args:
        profiler (torch.profiler.profile): a finished profiler.
        steps (int): steps it covered.
        wall_seconds (float): their wall-clock time.
        worker_seconds (float): the worker thread's embedding backward time in the window.
            Default: 0.

    Returns:
        Dict[str, float]: ``step`` and each part, ms per step.
    """
    totals = {part: 0.0 for part in PARTS}
    for event in profiler.key_averages():
        for part, (prefix, use_self) in PARTS.items():
            if event.key.startswith(prefix):
                totals[part] += event.self_cpu_time_total if use_self else event.cpu_time_total
    ms = {part: value / 1000.0 / steps for part, value in totals.items()}
    out = {"step": wall_seconds * 1000.0 / steps}
    out.update({"reader": ms["reader"], "input_dist": ms["input_dist"] + ms["input_dist_wait"]})
    out["embedding_lookup"] = max(ms["embedding_lookup"] - ms["embedding_backward_wait"], 0.0)
    out["tower_forward"] = ms["tower_forward"]
    out["heads_forward"] = ms["heads_forward"]
    out["embedding_backward_and_fused_optimizer"] = ms["embedding_backward_and_fused_optimizer"]
    out["backward_dense"] = max(ms["backward_all"] - ms["embedding_backward_and_fused_optimizer"], 0.0)
    out["dense_optimizer"] = ms["dense_optimizer"]
    out["train_metrics"] = ms["train_metrics"]
    out["embedding_backward_wait"] = ms["embedding_backward_wait"]
    out["other"] = max(out["step"] - sum(v for k, v in out.items() if k != "step"), 0.0)
    out["embedding_backward_on_worker"] = worker_seconds * 1000.0 / steps  # beside the step
    return {k: round(v, 3) for k, v in out.items()}


class StepProfiler:
    """
    Profiles a window of training steps and writes what it found into the run directory.

    Args:
        model (nn.Module): the MultiTaskModel whose tower and heads get scopes.
        run_dir (Path): where profile.json, profile_ops.txt and profile_trace.json go.
        start_step (int): steps to let pass first (warm-up).
        steps (int): steps to profile; 0 turns profiling off.
        enabled (bool): False on every rank but the one that writes.
        worker_seconds (Optional[Callable[[], float]]): the seconds the fused tables' backward
            has run on a worker thread so far (``EmbeddingBackwardOverlap.worker_seconds``),
            when it runs there. Read at the window's edges, where a backward may be running: the
            window's worker time is right to about one backward. Default: None.

    Example::

        >>> import tempfile, torch
        >>> from pathlib import Path
        >>> from torch import nn
        >>> from engagerec.profiling import StepProfiler
        >>> model = nn.Module()
        >>> model.tower, model.heads = nn.Linear(2, 2), nn.ModuleList([nn.Linear(2, 1)])
        >>> run = Path(tempfile.mkdtemp())
        >>> profiler = StepProfiler(model, run, start_step=1, steps=2)
        >>> for step in range(1, 5):
        ...     profiler.before_step(step)
        ...     _ = model.heads[0](model.tower(torch.ones(1, 2)))
        ...     profiler.after_step(step)
        >>> sorted(p.name for p in run.iterdir())
        ['profile.json', 'profile_ops.txt', 'profile_trace.json']
    """

    def __init__(
        self,
        model: nn.Module,
        run_dir: Path,
        start_step: int,
        steps: int,
        enabled: bool = True,
        worker_seconds: Optional[Callable[[], float]] = None,
    ) -> None:
        self.model, self.run_dir = model, Path(run_dir)
        self.worker_seconds = worker_seconds or (lambda: 0.0)
        self._worker_started = 0.0
        self.first, self.last = start_step + 1, start_step + steps
        self.enabled = enabled and steps > 0
        self._profiler: Optional[torch.profiler.profile] = None
        self._remove: Optional[Callable[[], None]] = None
        self._started = 0.0

    def before_step(self, step: int) -> None:
        """Start profiling before step ``start_step + 1``."""
        if self.enabled and step == self.first and self._profiler is None:  # once, even if an epoch ends here
            import time

            self._remove = label_modules(self.model)
            self._profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self._profiler.__enter__()
            self._started = time.perf_counter()
            self._worker_started = self.worker_seconds()

    def after_step(self, step: int) -> None:
        """Stop after the last profiled step and write the results."""
        if self._profiler is None or step != self.last:
            return
        import time

        wall = time.perf_counter() - self._started
        self._profiler.__exit__(None, None, None)
        self._remove()
        steps = self.last - self.first + 1
        parts = breakdown(self._profiler, steps, wall, self.worker_seconds() - self._worker_started)
        (self.run_dir / "profile.json").write_text(
            json.dumps({"steps": steps, "ms_per_step": parts}, indent=1)
        )
        table = self._profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
        (self.run_dir / "profile_ops.txt").write_text(table)
        self._profiler.export_chrome_trace(str(self.run_dir / "profile_trace.json"))
        self._profiler = None
