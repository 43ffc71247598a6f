"""The GBDT reference's fits, in a Python process of their own (``engagerec_study.gbdt`` starts
it): this module imports numpy, pyarrow, scikit-learn and engagerec.xauc, never torch. In one
process the two OpenMP runtimes decide between them how the cores are shared, and with torch's
loaded first the fits after the towers ran 3x slower (make demo: 21 s a seed against 7); a
process of their own keeps the fits and torch apart whatever the caller imported, in any order,
and starts with its own OpenMP settings (``gbdt.fit_environment``).

Run as ``python -m engagerec_study.gbdt_fit REQUEST RESULT``: REQUEST is a JSON file with
``fit_reference``'s arguments; RESULT gets ``{"metrics": ..., "torch_loaded": ...}``, or
``{"error": ...}`` when the input is refused (a ValueError's message).

Single-valued sparse features with many values (ids) are target-encoded with scikit-learn's
cross-fitted TargetEncoder (fitted on train only); the other single-valued ones are native
categorical features; each multi-valued feature (genres, history) contributes its length; dense
features are used as they are. One model per task: a HistGradientBoostingRegressor for a
regression label, a HistGradientBoostingClassifier for a binary one, each with early stopping on
the validation split, on the rows where that label is present. No tuning on test. Given each
task's iteration count (chosen so on an earlier split with validation rows), it fits that many
on data without validation rows: the refit on training and validation rows together.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow.parquet as pq
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
from sklearn.metrics import accuracy_score, mean_absolute_error, mean_squared_error, roc_auc_score
from sklearn.model_selection import KFold
from sklearn.preprocessing import TargetEncoder

from engagerec.xauc import exact_xauc

NATIVE_CATEGORICAL_MAX = 250  # HistGradientBoosting's categorical features allow at most 255 values


def _matrix(
    data_dir: Path, split: str, layout: Dict[str, Any], rows: Optional[np.ndarray] = None
) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
    """(feature columns, label columns) of one prepared split (only ``rows`` of it, when given:
    taken before any column becomes a float64 array)."""
    table = pq.read_table(data_dir / split, page_checksum_verification=True)  # damaged pages fail
    if rows is not None:
        table = table.take(rows)
    columns: Dict[str, np.ndarray] = {}
    for feature in layout["sparse"]:
        column = table.column(feature["name"])
        if feature["multi"]:
            offsets = column.combine_chunks().offsets.to_numpy()
            columns[f"{feature['name']}__length"] = np.diff(offsets).astype(np.float64)
        else:
            columns[feature["name"]] = column.to_numpy().astype(np.int64)
    for name in layout["dense"]:
        columns[name] = table.column(name).to_numpy().astype(np.float64)
    labels = {label["name"]: table.column(label["name"]).to_numpy() for label in layout["labels"]}
    return columns, labels


def fit_reference(
    data_dir: str | Path,
    layout: Dict[str, Any],
    seed: int = 0,
    tasks: Optional[Sequence[Sequence[str]]] = None,
    iterations: Optional[Dict[str, int]] = None,
    train_rows: Optional[int] = None,
) -> Dict[str, float]:
    """Fit the GBDT reference per task in this process and score it on test
    (``engagerec_study.gbdt.gbdt_reference`` calls it in a process of its own).

    Args:
        data_dir: a prepared dataset.
        layout: its columns (``engagerec_study.gbdt.data_layout``): ``sparse`` (name, multi,
            rows of its id space), ``dense`` names and ``labels`` (name, kind), in schema order.
        seed: the target encoder's folds and the boosting's randomness.
        tasks: (task name, label, kind) per model; default one task per label.
        iterations: task name -> boosting iterations chosen beforehand (then the validation
            split is not read); default: chosen on ``data_dir``'s validation split.
        train_rows: fit on this many training rows, drawn at random with ``seed`` (default all):
            at millions of rows the boosting's time grows with the rows while its quality has
            long levelled off. Validation and test are always whole.

    Returns:
        Dict[str, float]: test metrics under the towers' names, each ``<task>/iterations``, and
        with ``train_rows`` given, ``train_rows``: the training rows fitted on.

    Raises:
        ValueError: ``data_dir`` has no validation rows and ``iterations`` lacks a task.
    """
    data_dir = Path(data_dir)
    splits = ("train", "test") if iterations is not None else ("train", "val", "test")
    rows = sum(fragment.metadata.num_rows for fragment in pq.ParquetDataset(data_dir / "train").fragments)
    keep = None
    if train_rows is not None and train_rows < rows:  # a seeded sample, in the shards' order
        keep = np.sort(np.random.default_rng(seed).choice(rows, size=train_rows, replace=False))
        rows = train_rows
    parts = {split: _matrix(data_dir, split, layout, keep if split == "train" else None) for split in splits}
    if iterations is None and not any(len(values) for values in parts["val"][1].values()):
        raise ValueError(
            f"gbdt: {data_dir} has no validation rows to choose the iterations on; pass iterations"
        )
    singles = [f for f in layout["sparse"] if not f["multi"]]
    encoded = [f["name"] for f in singles if f["rows"] > NATIVE_CATEGORICAL_MAX]
    native = [f["name"] for f in singles if f["name"] not in encoded]
    plain = [k for k in parts["train"][0] if k not in encoded and k not in native]

    def design(split: str, encoder: TargetEncoder, fit_target=None, mask=None) -> np.ndarray:
        """The split's feature matrix (rows in ``mask``); ids target-encoded, fitted on train."""
        columns = (
            parts[split][0]
            if mask is None or mask.all()
            else {n: v[mask] for n, v in parts[split][0].items()}
        )
        rest = np.stack([columns[n].astype(np.float64) for n in native + plain], axis=1)
        if not encoded:  # no id with many values (the study's inputs): nothing to target-encode
            return rest
        ids = np.stack([columns[n] for n in encoded], axis=1)
        if fit_target is not None:
            target = fit_target if mask is None else fit_target[mask]
            target_encoded = encoder.fit_transform(ids, target)  # cross-fitted on train
        else:
            target_encoded = encoder.transform(ids)
        return np.concatenate([rest, target_encoded], axis=1)

    categorical = np.zeros(len(native) + len(plain) + len(encoded), dtype=bool)
    categorical[: len(native)] = True
    out: Dict[str, float] = {} if train_rows is None else {"train_rows": float(rows)}
    for task, label, kind in tasks or [
        (spec["name"], spec["name"], spec["kind"]) for spec in layout["labels"]
    ]:
        binary = kind == "binary"
        # rows whose label is missing (NaN) take no part in this label's model or score
        present = {split: ~np.isnan(parts[split][1][label].astype(np.float64)) for split in parts}
        y = {split: parts[split][1][label][present[split]].astype(np.float64) for split in parts}
        if any(len(values) < 2 or (binary and len(np.unique(values)) < 2) for values in y.values()):
            print(
                f"gbdt: '{task}' left out: a split has too few rows or one class of '{label}'",
                file=sys.stderr,
            )
            continue
        low, high = float(y["train"].min()), float(y["train"].max())  # regression: clip to train's range
        encoder = TargetEncoder(target_type="continuous", cv=KFold(5, shuffle=True, random_state=seed))
        x_train = design("train", encoder, parts["train"][1][label], present["train"])
        x_test = design("test", encoder, mask=present["test"])
        model_class = HistGradientBoostingClassifier if binary else HistGradientBoostingRegressor
        model = model_class(
            categorical_features=categorical,
            max_iter=500,
            learning_rate=0.05,
            early_stopping=False,
            random_state=seed,
        )
        if iterations is not None:
            if task not in iterations:
                raise ValueError(
                    f"gbdt: no iteration count given for task '{task}' ({sorted(iterations)} were)"
                )
            best_iter = int(iterations[task])
        else:
            # early stopping on our validation split: fit on train, then refit with the best iteration count
            x_val = design("val", encoder, mask=present["val"])
            best_iter, _ = _best_iterations(model, x_train, y["train"], x_val, y["val"], binary, (low, high))
        model.set_params(max_iter=best_iter)
        model.fit(x_train, y["train"])
        if binary:
            probability = model.predict_proba(x_test)[:, 1]
            out[f"{task}/auc"] = float(roc_auc_score(y["test"], probability))
            out[f"{task}/accuracy"] = float(accuracy_score(y["test"], probability >= 0.5))
        else:
            prediction = np.clip(model.predict(x_test), low, high)
            out[f"{task}/mse"] = float(mean_squared_error(y["test"], prediction))
            out[f"{task}/mae"] = float(mean_absolute_error(y["test"], prediction))
            out[f"{task}/xauc"] = exact_xauc(prediction, y["test"])
        out[f"{task}/iterations"] = float(best_iter)
    return out


def _best_iterations(model, x_train, y_train, x_val, y_val, binary: bool, bounds) -> Tuple[int, float]:
    """The iteration count with the best validation loss (MSE or log loss), by staged prediction."""
    model.fit(x_train, y_train)
    if not binary:
        scores = [mean_squared_error(y_val, np.clip(p, *bounds)) for p in model.staged_predict(x_val)]
    else:
        eps = 1e-7
        scores = [
            float(
                -np.mean(
                    y_val * np.log(np.clip(p[:, 1], eps, 1))
                    + (1 - y_val) * np.log(np.clip(1 - p[:, 1], eps, 1))
                )
            )
            for p in model.staged_predict_proba(x_val)
        ]
    best = int(np.argmin(scores))
    return best + 1, float(scores[best])


def main(argv: List[str]) -> int:
    """``python -m engagerec_study.gbdt_fit REQUEST RESULT``: fit as REQUEST asks, write RESULT.

    Args:
        argv: the request file (JSON: ``data_dir``, ``layout``, ``seed``, ``tasks``,
            ``iterations``, ``train_rows``) and the result file.

    Returns:
        int: 0 once RESULT is written (a refused input included: its ``error``).
    """
    request_path, result_path = argv
    request = json.loads(Path(request_path).read_text())
    # the caller refuses the result of a process that loaded torch (the reason it exists): by an
    # import before the fits (then none is made) or by one they made
    result: Dict[str, Any] = {"torch_loaded": "torch" in sys.modules}
    if not result["torch_loaded"]:
        try:
            result["metrics"] = fit_reference(**request)
        except ValueError as err:  # refused input: the caller raises it again; anything else is a bug
            result["error"] = str(err)
        result["torch_loaded"] = "torch" in sys.modules
    Path(result_path).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
