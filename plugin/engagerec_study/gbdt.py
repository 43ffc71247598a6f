"""A gradient-boosted-tree reference (scikit-learn) on the same prepared splits as the towers,
fitted in a Python process of its own that never imports torch (``engagerec_study.gbdt_fit``,
which says how the features are made and why the process is separate)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from engagerec.data.manifest import check_prepared
from engagerec.data.schema import DatasetSchema

FIT_MODULE = "engagerec_study.gbdt_fit"


def fit_environment(environ: Mapping[str, str]) -> Dict[str, str]:
    """The fitting process's environment: ``environ`` with OpenMP's idle threads told to sleep
    (``OMP_WAIT_POLICY=PASSIVE``) unless it says otherwise. scikit-learn's boosting runs many
    short parallel regions, and threads that spin between them on cores other processes want
    (torch jobs, other runs) slowed a fit 10x (146 s against 14 s under a load of 8 on 2 cores);
    the numbers do not change.

    Args:
        environ: the environment the process starts from (this one's).

    Example::

        >>> fit_environment({"PATH": "/bin"})
        {'OMP_WAIT_POLICY': 'PASSIVE', 'PATH': '/bin'}
        >>> fit_environment({"OMP_WAIT_POLICY": "active"})  # a setting of the caller's stays
        {'OMP_WAIT_POLICY': 'active'}
    """
    return {"OMP_WAIT_POLICY": "PASSIVE", **environ}


def data_layout(schema: DatasetSchema) -> Dict[str, Any]:
    """What the fitting process reads of a prepared dataset's schema, as JSON: the sparse features
    (name, multi-valued, rows of its id space), the dense names and the labels (name, kind), in
    the schema's order (the feature matrix's column order).

    Args:
        schema: the prepared dataset's schema.
    """
    sparse = [
        {"name": f.name, "multi": f.multi, "rows": schema.num_embeddings(f.id_space)} for f in schema.sparse
    ]
    labels = [{"name": label.name, "kind": label.kind} for label in schema.labels]
    return {"sparse": sparse, "dense": schema.dense_names, "labels": labels}


def gbdt_reference(
    data_dir: str | Path,
    seed: int = 0,
    tasks: Optional[List[Tuple[str, str, str]]] = None,
    iterations: Optional[Dict[str, int]] = None,
    train_rows: Optional[int] = None,
) -> Dict[str, float]:
    """Test metrics of the GBDT reference, under the towers' metric names (and each task's
    ``<task>/iterations``), fitted in a fresh Python process that never imports torch (its
    output reaches this process's stdout and stderr).

    Args:
        data_dir: a prepared dataset.
        seed: the target encoder's folds and the boosting's randomness.
        tasks: (task name, label, kind) per model to fit, as the towers' tasks are; default one
            task per label of the prepared data. A task whose label has fewer than two present
            rows in a split, or one class only, is left out (no metrics, a note on stderr).
        iterations: task name -> boosting iterations, chosen beforehand (an earlier call's
            ``<task>/iterations`` on data with validation rows); the validation split is then
            not read, so ``data_dir`` may have none. Default: chosen on ``data_dir``'s own.
        train_rows: fit on a seeded sample of this many training rows (default all; see
            ``engagerec_study.gbdt_fit.fit_reference``); the result's ``train_rows`` says how many.

    Raises:
        ValueError: ``data_dir`` has no validation rows and ``iterations`` lacks a task.
        RuntimeError: the fitting process failed (its traceback on stderr) or loaded torch.

    Example::

        >>> import tempfile
        >>> from engagerec.config import load_config
        >>> from engagerec.data.prepare import prepare
        >>> tmp = Path(tempfile.mkdtemp())
        >>> cfg = load_config("synthetic_study", ["data.source.synthetic.num_rows=2000"])
        >>> _ = prepare(cfg.data, tmp)
        >>> chosen = gbdt_reference(tmp, tasks=[("skip", "skip", "binary")])
        >>> sorted(chosen)
        ['skip/accuracy', 'skip/auc', 'skip/iterations']
        >>> again = gbdt_reference(tmp, tasks=[("skip", "skip", "binary")], iterations={"skip": 7})
        >>> again["skip/iterations"]
        7.0
    """
    data_dir = Path(data_dir)  # the process starts in this one's working directory
    check_prepared(data_dir)  # sizes and files, before the fitting process reads every shard
    request = {
        "data_dir": str(data_dir),
        "layout": data_layout(DatasetSchema.load(data_dir)),
        "seed": seed,
        "tasks": tasks,
        "iterations": iterations,
        "train_rows": train_rows,
    }
    with tempfile.TemporaryDirectory(prefix="engagerec-gbdt-") as work:
        request_path, result_path = Path(work) / "request.json", Path(work) / "result.json"
        request_path.write_text(json.dumps(request))
        done = subprocess.run(
            [sys.executable, "-m", FIT_MODULE, str(request_path), str(result_path)],
            capture_output=True,
            text=True,
            env=fit_environment(os.environ),
        )
        # through this process's streams, so that callers' redirections hold for the fits too
        sys.stdout.write(done.stdout)
        sys.stderr.write(done.stderr)
        if done.returncode != 0 or not result_path.is_file():
            raise RuntimeError(
                f"the GBDT's fitting process failed (exit status {done.returncode}): see stderr"
            )
        result = json.loads(result_path.read_text())
    if result["torch_loaded"]:
        raise RuntimeError(
            f"the GBDT's fitting process ({FIT_MODULE}) imported torch: its fits would share the cores "
            "with torch's OpenMP runtime (3x slower seen); nothing it imports may import torch"
        )
    if "error" in result:
        raise ValueError(result["error"])
    return result["metrics"]
