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

How: a forward hook on each lookup of a sharded EmbeddingBagCollection that holds fused tables
(FBGEMM's TBEs, their optimizer applied in backward) hands the rest of the model a detached
view of the pooled output, a leaf of the autograd graph. When autograd has accumulated the
leaf's gradient, a hook submits the backward of the lookup's own graph to a one-thread executor.
Collectives stay on the main thread: the output distribution's backward runs there, before the
leaf's gradient is complete. While the worker runs, the main thread's ops use one intra-op
thread fewer, so that the worker has a core. A forward pre-hook on the same lookups waits for
the worker and gives the thread back.

The fused optimizers' ``zero_grad`` and ``step`` pass the learning rate (train.lr_schedule) to
FBGEMM while the worker may still run the last backward: that is safe because FBGEMM's CPU
lookup reads the rate in its forward and its backward applies that one (checked in
tests/test_backward_overlap.py).
"""

from __future__ import annotations

import concurrent.futures
import time
from typing import Any, List, Optional

import torch
from torch import nn
from torch.autograd.profiler import record_function
from torch.utils.hooks import RemovableHandle
from torchrec.distributed.batched_embedding_kernel import BatchedDenseEmbeddingBag
from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection
from torchrec.optim.fused import FusedOptimizerModule

from engagerec.profiling import WAIT

SETTINGS = ("auto", "main", "worker")


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


class EmbeddingBackwardOverlap:
    """
    Runs the backward of ``model``'s fused embedding lookups (and so their optimizer update) on a
    worker thread, started when the gradient of their pooled output is ready; their next
    lookup waits for it (see the module docstring).

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
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="engagerec-embedding-backward"
        )
        self._pending: List[concurrent.futures.Future] = []
        self.backward_passes = 0  # submitted to the worker so far
        self._main_threads: Optional[int] = None  # the main thread's intra-op threads, while lent
        self.worker_seconds = 0.0  # the worker's time in them (the profiler's window reads it)
        self._handles: List[RemovableHandle] = []
        for lookup in self.lookups:
            self._handles.append(lookup.register_forward_pre_hook(self._before_lookup))
            self._handles.append(lookup.register_forward_hook(self._after_lookup))

    @property
    def pending(self) -> int:
        """Backward passes submitted and not yet waited for."""
        return len(self._pending)

    def wait(self) -> None:
        """Wait for every submitted backward; then re-raise the first error one of them met."""
        pending, self._pending = self._pending, []
        if pending:
            with record_function(WAIT):
                concurrent.futures.wait(pending)
        self._take_the_core_back()
        for future in pending:
            future.result()

    def close(self) -> None:
        """Wait, then remove the hooks and stop the worker."""
        try:
            self.wait()
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles = []
            self._executor.shutdown(wait=True)

    def _backward(self, output: torch.Tensor, gradient: torch.Tensor) -> None:
        """On the worker: the lookup's backward, which applies the fused optimizer's update."""
        started = time.perf_counter()
        torch.autograd.backward(output, gradient)
        self.worker_seconds += time.perf_counter() - started

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

    def _before_lookup(self, module: nn.Module, inputs: Any) -> None:
        self.wait()  # the tables must hold the last step's update before they are read

    def _after_lookup(self, module: nn.Module, inputs: Any, output: Any) -> Optional[torch.Tensor]:
        if not (module.training and torch.is_grad_enabled()):
            return None
        if not isinstance(output, torch.Tensor) or output.grad_fn is None:
            return None
        leaf = output.detach().requires_grad_()

        def start_backward(ready: torch.Tensor) -> None:
            gradient, ready.grad = ready.grad, None
            self._pending.append(self._executor.submit(self._backward, output, gradient))
            self.backward_passes += 1
            self._give_the_worker_a_core()

        leaf.register_post_accumulate_grad_hook(start_backward)
        return leaf
