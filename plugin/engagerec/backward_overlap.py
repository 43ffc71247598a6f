"""The fused embedding tables' backward on a worker thread, beside the rest of the training step.

FBGEMM's CPU loop backward (engagerec.embedding_backward) updates the large tables on one
thread, while the process's other cores wait for it. ``EmbeddingBackwardOverlap`` starts that
backward on a worker thread the moment its gradient is ready, and the main thread goes on with
the work that does not read those tables: the rest of the backward (the replicated small
tables), the dense optimizer step, the training metrics, the next batch's read and its input
distribution. The next lookup of the tables waits for the worker first, so every lookup reads
the weights it would read without the overlap: the updates are the same, bit for bit
(tests/test_backward_overlap.py). On a 2-core Intel Xeon with AMX the embedding backward was a
fifth of a KuaiRand-1K step (benchmarks/RESULTS.md, profile_precision_intel_loop); with the
worker, whole epochs ran 1.43x as fast (train_levers_intel_worker).

How: a forward hook on each TBE (FBGEMM's batch of tables) of each lookup of a sharded
EmbeddingBagCollection that holds fused tables (their optimizer applied in backward) hands the
rest of the model a detached view of the TBE's pooled output, a leaf of the autograd graph.
When autograd has accumulated the gradients of all of a lookup's leaves, hooks make one backward
per TBE ready. The worker takes them the largest first (by ids); the main thread, when it
reaches the next lookup (a forward pre-hook) with backward passes the worker has not started,
runs them itself, the smallest first, rather than wait: on KuaiRand-1K the history's TBE takes
the worker, and the main thread the ids' TBE. Collectives stay on the main thread: the output
distribution's backward runs there, before the leaves' gradients are complete. While the
worker runs, the main thread's ops use one intra-op thread fewer, so that the worker has a
core; the worker's own parallel regions run on its one thread.

The fused optimizers' ``zero_grad`` and ``step`` pass the learning rate (train.lr_schedule) to
FBGEMM while the worker may still run the last backward: that is safe because FBGEMM's CPU
lookup reads the rate in its forward and its backward applies that one (checked in
tests/test_backward_overlap.py).
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import threading
import time
from typing import Any, Dict, List, Optional

import torch
from torch import nn
from torch.autograd.profiler import record_function
from torch.utils.hooks import RemovableHandle
from torchrec.distributed.batched_embedding_kernel import BatchedDenseEmbeddingBag
from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection
from torchrec.optim.fused import FusedOptimizerModule

from engagerec.profiling import WAIT

SETTINGS = ("auto", "main", "worker")
WORKER_NAME = "engagerec-embedding-backward"


def fused_lookups(model: nn.Module) -> List[nn.Module]:
    """
    The lookup modules of ``model``'s sharded EmbeddingBagCollections that hold fused tables
    (an FBGEMM TBE with its optimizer in backward). Replicated tables (their lookups wrapped in
    DistributedDataParallel) are left out: their gradients feed the dense optimizer.

    Args:
        model (nn.Module): a DistributedModelParallel, or any module holding sharded collections.

    Returns:
        List[nn.Module]: the lookups, in module order.

    Example::

        >>> from torch import nn
        >>> from engagerec.backward_overlap import fused_lookups
        >>> fused_lookups(nn.Linear(2, 1))  # no sharded collection
        []
    """
    found = []
    for module in model.modules():
        if isinstance(module, ShardedEmbeddingBagCollection):
            # torchrec keeps one lookup per sharding type here (its train pipeline reads it too)
            for lookup in module._lookups:
                if isinstance(lookup, nn.parallel.DistributedDataParallel):
                    continue
                inner = list(lookup.modules())
                fused = any(isinstance(m, FusedOptimizerModule) for m in inner)
                # a dense-kernel table's gradient feeds the dense optimizer on the main thread
                dense = any(isinstance(m, BatchedDenseEmbeddingBag) for m in inner)
                if fused and not dense:
                    found.append(lookup)
    return found


def uses_worker(setting: str, device: torch.device, loop_path: bool) -> bool:
    """
    Whether ``train.embedding_backward_thread`` runs the fused tables' backward on a worker thread.

    Args:
        setting (str): ``auto``, ``main`` or ``worker``.
        device (torch.device): where the model computes. On a GPU the backward is asynchronous
            already: always the main thread.
        loop_path (bool): whether FBGEMM's one-thread loop backward was taken
            (engagerec.embedding_backward). ``auto`` takes the worker with it, when this process
            has at least two threads (torchrun gives each of several ranks on a machine one).

    Returns:
        bool: True for the worker thread.

    Raises:
        ValueError: an unknown setting.

    Example::

        >>> import torch
        >>> from engagerec.backward_overlap import uses_worker
        >>> uses_worker("worker", torch.device("cpu"), loop_path=False)
        True
        >>> uses_worker("auto", torch.device("cpu"), loop_path=False)
        False
    """
    if setting not in SETTINGS:
        raise ValueError(f"train.embedding_backward_thread must be one of {SETTINGS}, got {setting!r}")
    if device.type != "cpu" or setting == "main":
        return False
    return setting == "worker" or (loop_path and torch.get_num_threads() >= 2)


def overlap_if_used(
    model: nn.Module, setting: str, device: torch.device, loop_path: bool
) -> Optional["EmbeddingBackwardOverlap"]:
    """
    The ``EmbeddingBackwardOverlap`` of ``model`` when ``uses_worker`` says so and ``model`` has
    fused lookups to move; else None (the main thread runs the backward).

    Args:
        model (nn.Module): the DistributedModelParallel that will train.
        setting (str): ``train.embedding_backward_thread``.
        device (torch.device): where it trains.
        loop_path (bool): whether FBGEMM's one-thread loop backward was taken.

    Returns:
        Optional[EmbeddingBackwardOverlap]: the overlap, hooked into ``model``, or None.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from engagerec.backward_overlap import overlap_if_used
        >>> cpu = torch.device("cpu")
        >>> overlap_if_used(nn.Linear(2, 1), "worker", cpu, loop_path=True) is None  # no fused tables
        True
    """
    if not uses_worker(setting, device, loop_path):
        return None
    overlap = EmbeddingBackwardOverlap(model)
    if not overlap.lookups:  # no fused tables (all replicated, say): nothing to move
        overlap.close()
        return None
    return overlap


@dataclasses.dataclass
class _Backward:
    """One TBE's backward, ready to run: its pooled output, that output's gradient, and its ids
    (the work's size)."""

    ids: int
    output: torch.Tensor
    gradient: torch.Tensor


@dataclasses.dataclass
class _Gathering:
    """A lookup's TBE backward passes of one forward: ready together once every TBE's gradient
    has come (they come together, from the backward of the lookup's one concatenation), so that
    the worker can take the largest."""

    awaited: int = 0  # TBEs whose gradient has not come yet
    passes: List[_Backward] = dataclasses.field(default_factory=list)


class EmbeddingBackwardOverlap:
    """
    Runs the backward of ``model``'s fused embedding lookups (and so their optimizer update) on a
    worker thread, started when the gradient of their pooled output is ready; their next
    lookup waits for it (see the module docstring).

    Each TBE of a lookup (FBGEMM's batch of tables) is a backward of its own. The worker takes the
    one with the most ids first; the main thread, when it reaches the next lookup with backward
    passes the worker has not started, runs them itself, the fewest ids first, rather than wait.

    Call ``wait()`` before anything else reads the tables or their optimizer state (a
    checkpoint, an export), and ``close()`` when done: it waits and removes the hooks.

    Args:
        model (nn.Module): a DistributedModelParallel (or any module) with sharded
            EmbeddingBagCollections of fused tables.

    Example::

        >>> from torch import nn
        >>> from engagerec.backward_overlap import EmbeddingBackwardOverlap
        >>> overlap = EmbeddingBackwardOverlap(nn.Linear(2, 1))  # no fused lookups: nothing hooked
        >>> overlap.lookups, overlap.pending
        ([], 0)
        >>> overlap.close()
    """

    def __init__(self, model: nn.Module) -> None:
        self.lookups = fused_lookups(model)
        self._lock = threading.Condition()
        self._ready: List[_Backward] = []  # not started, in order of ids
        self._gatherings: Dict[int, _Gathering] = {}  # lookup -> its last forward's passes
        self._running = 0  # started on either thread, not finished
        self._errors: List[BaseException] = []
        self._closed = False
        self.backward_passes = 0  # TBE backward passes run so far, on either thread
        self.passes_on_main = 0  # of which the main thread ran, instead of waiting
        self._main_threads: Optional[int] = None  # the main thread's intra-op threads, while lent
        self.worker_seconds = 0.0  # the worker's time in them (the profiler's window reads it)
        self._handles: List[RemovableHandle] = []
        for index, lookup in enumerate(self.lookups):
            self._handles.append(
                lookup.register_forward_pre_hook(functools.partial(self._before_lookup, index))
            )
            for tbe in lookup._emb_modules:  # torchrec's TBE modules, one per group of tables
                self._handles.append(tbe.register_forward_hook(functools.partial(self._after_tbe, index)))
        threads = torch.get_num_threads()
        self._worker_ready = False
        self._worker = threading.Thread(target=self._work, name=WORKER_NAME, daemon=True)
        self._worker.start()
        with self._lock:
            self._lock.wait_for(lambda: self._worker_ready)
        torch.set_num_threads(threads)  # the worker's setting also reaches MKL's, process-wide

    @property
    def pending(self) -> int:
        """Backward passes whose gradient has come and that have not finished."""
        with self._lock:
            gathered = sum(len(gathering.passes) for gathering in self._gatherings.values())
            return gathered + len(self._ready) + self._running

    def wait(self) -> None:
        """Finish every backward whose gradient has come: run those the worker has not started
        on this thread, then wait for the worker; re-raise the first error one of them met."""
        with self._lock:
            self._release_gathered()
            busy = bool(self._ready or self._running)
        if busy:
            with record_function(WAIT):
                while True:
                    with self._lock:
                        if self._ready:  # the worker has not started it: run it here, not wait
                            backward = self._ready.pop(0)  # the fewest ids first
                            self._running += 1
                        elif self._running:
                            self._lock.wait()
                            continue
                        else:
                            break
                    self._run(backward, on_worker=False)
        self._take_the_core_back()
        with self._lock:
            errors, self._errors = self._errors, []
        if errors:
            raise errors[0]

    def close(self) -> None:
        """Wait, then remove the hooks and stop the worker."""
        try:
            self.wait()
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles = []
            with self._lock:
                self._closed = True
                self._lock.notify_all()
            self._worker.join()

    def _work(self) -> None:
        """The worker: run the ready backward passes, the most ids first, until closed."""
        # one OpenMP thread of its own: FBGEMM's parallel regions run inline rather than start a
        # second team of threads beside the main thread's on a machine of two cores
        torch.set_num_threads(1)
        with self._lock:
            self._worker_ready = True
            self._lock.notify_all()
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._ready or self._closed)
                if not self._ready:
                    return
                backward = self._ready.pop()  # the most ids
                self._running += 1
            self._run(backward, on_worker=True)

    def _run(self, backward: _Backward, on_worker: bool) -> None:
        """One TBE's backward, which applies the fused optimizer's update."""
        started = time.perf_counter()
        try:
            torch.autograd.backward(backward.output, backward.gradient)
        except BaseException as error:  # noqa: BLE001 - re-raised on the main thread by wait()
            with self._lock:
                self._errors.append(error)
        finally:
            with self._lock:
                self._running -= 1
                self.backward_passes += 1
                if on_worker:
                    self.worker_seconds += time.perf_counter() - started
                else:
                    self.passes_on_main += 1
                self._lock.notify_all()

    def _enqueue(self, backward: _Backward) -> None:
        """Make ``backward`` ready for either thread (kept in order of ids)."""
        bisect.insort(self._ready, backward, key=lambda b: b.ids)
        self._lock.notify_all()

    def _release_gathered(self) -> None:
        """Ready every gathered backward, also of a lookup one of whose TBEs got no gradient."""
        for gathering in self._gatherings.values():
            for backward in gathering.passes:
                self._enqueue(backward)
            gathering.passes = []

    def _give_the_worker_a_core(self) -> None:
        # the main thread's ops run on one thread fewer while the worker runs: on 2 cores, 2
        # intra-op threads beside it (OpenMP's threads wait for work spinning, on the core the
        # worker needs) left the worker 1.28x over whole KuaiRand-1K epochs, against 1.43x
        # (benchmarks/RESULTS.md, train_levers_intel_worker_no_core_sharing and train_levers_intel_worker)
        threads = torch.get_num_threads()
        if self._main_threads is None and threads > 1:
            self._main_threads = threads
            torch.set_num_threads(threads - 1)

    def _take_the_core_back(self) -> None:
        if self._main_threads is not None:
            torch.set_num_threads(self._main_threads)
            self._main_threads = None

    def _before_lookup(self, lookup: int, module: nn.Module, inputs: Any) -> None:
        self.wait()  # the tables must hold the last step's update before they are read
        with self._lock:
            self._gatherings[lookup] = _Gathering()

    def _after_tbe(self, lookup: int, module: nn.Module, inputs: Any, output: Any) -> Optional[torch.Tensor]:
        if not (module.training and torch.is_grad_enabled()):
            return None
        if not isinstance(output, torch.Tensor) or output.grad_fn is None:
            return None
        leaf = output.detach().requires_grad_()
        values = getattr(inputs[0], "values", None) if inputs else None
        ids = values().numel() if callable(values) else 0
        with self._lock:
            gathering = self._gatherings.setdefault(lookup, _Gathering())
            gathering.awaited += 1

        def gradient_ready(ready: torch.Tensor) -> None:
            backward = _Backward(ids, output, ready.grad)
            ready.grad = None
            with self._lock:
                gathering.passes.append(backward)
                gathering.awaited -= 1
                if gathering.awaited == 0:
                    self._release_gathered()
            self._give_the_worker_a_core()

        leaf.register_post_accumulate_grad_hook(gradient_ready)
        return leaf
