"""A gradient-boosted-tree reference (scikit-learn) on the same prepared splits as the towers.

Single-valued sparse features with many values (ids) are target-encoded with
scikit-learn's cross-fitted TargetEncoder (fitted on train only); the other single-valued
ones are native categorical features; each multi-valued feature (genres, history)
contributes its length; dense features are used as they are. One model per label of the
prepared data: a HistGradientBoostingRegressor for a regression label, a
HistGradientBoostingClassifier for a binary one, each with early stopping on the validation
split, on the rows where that label is present. No tuning on test. Given each task's
iteration count (chosen so on an earlier split with validation rows), it fits that many on
data without validation rows: the refit on training and validation rows together.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import pyarrow.parquet as pq
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
from sklearn.metrics import accuracy_score, mean_absolute_error, mean_squared_error, roc_auc_score
from sklearn.model_selection import KFold
from sklearn.preprocessing import TargetEncoder

from engagerec.data.schema import DatasetSchema
from engagerec.metrics import exact_xauc

NATIVE_CATEGORICAL_MAX = 250  # HistGradientBoosting's categorical features allow at most 255 values


def _matrix(
    data_dir: Path, split: str, schema: DatasetSchema
) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
    """(feature columns, label columns) of one prepared split."""
    table = pq.read_table(data_dir / split)
    columns: Dict[str, np.ndarray] = {}
    for feature in schema.sparse:
        column = table.column(feature.name)
        if feature.multi:
            offsets = column.combine_chunks().offsets.to_numpy()
            columns[f"{feature.name}__length"] = np.diff(offsets).astype(np.float64)
        else:
            columns[feature.name] = column.to_numpy().astype(np.int64)
    for name in schema.dense_names:
        columns[name] = table.column(name).to_numpy().astype(np.float64)
    labels = {name: table.column(name).to_numpy() for name in schema.label_names}
    return columns, labels


def gbdt_reference(
    data_dir: str | Path,
    seed: int = 0,
    tasks: Optional[List[Tuple[str, str, str]]] = None,
    iterations: Optional[Dict[str, int]] = None,
) -> Dict[str, float]:
    """Test metrics of the GBDT reference, under the towers' metric names (and each task's
    ``<task>/iterations``).

    Args:
        data_dir: a prepared dataset.
        seed: the target encoder's folds and the boosting's randomness.
        tasks: (task name, label, kind) per model to fit, as the towers' tasks are; default one
            task per label of the prepared data. A task whose label has fewer than two present
            rows in a split, or one class only, is left out (no metrics, a note on stderr).
        iterations: task name -> boosting iterations, chosen beforehand (an earlier call's
            ``<task>/iterations`` on data with validation rows); the validation split is then
            not read, so ``data_dir`` may have none. Default: chosen on ``data_dir``'s own.

    Raises:
        ValueError: ``data_dir`` has no validation rows and ``iterations`` lacks a task.

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
    data_dir = Path(data_dir)
    schema = DatasetSchema.load(data_dir)
    splits = ("train", "test") if iterations is not None else ("train", "val", "test")
    parts = {split: _matrix(data_dir, split, schema) for split in splits}
    if iterations is None and not any(len(values) for values in parts["val"][1].values()):
        raise ValueError(
            f"gbdt: {data_dir} has no validation rows to choose the iterations on; pass iterations"
        )
    singles = [f for f in schema.sparse if not f.multi]
    encoded = [f.name for f in singles if schema.num_embeddings(f.id_space) > NATIVE_CATEGORICAL_MAX]
    native = [f.name for f in singles if f.name not in encoded]
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
    out: Dict[str, float] = {}
    for task, label, kind in tasks or [(spec.name, spec.name, spec.kind) for spec in schema.labels]:
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
