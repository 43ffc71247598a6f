"""What every results section shares: the Section contract, the project's quality targets, a
config prepared into the section's own directory, the spec of a config, and small metric
helpers."""

from __future__ import annotations

import contextlib
import dataclasses
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List

import numpy as np

from engagerec.config import ExperimentConfig
from engagerec_study.sections.cache import file_digest

# issue 9's quality targets for the bundled KuaiRand data, per split (metric -> target; the
# direction is the metric's own): the comparison and ensemble sections state them met or not
TARGETS = {
    "random": {"watch_ratio/mse": 0.090, "skip/auc": 0.82},
    "temporal": {"watch_ratio/mse": 0.110, "skip/auc": 0.76},
}


@dataclass
class Section:
    """One section of docs/RESULTS.md.

    Args:
        name: its cache and figure name (``random``, ``threshold``...).
        title: its heading.
        spec: seeds -> the JSON-able inputs that decide its numbers (hashed for the cache).
        compute: (spec, work directory) -> its data (JSON-able; runs may go under the directory).
        render: (its data, every section's cached data by name, figures directory) -> markdown.
        needs: sections whose data ``render`` also reads (computed first).
        version: bump it when ``compute`` changes what it computes: the cached data is then stale.
    """

    name: str
    title: str
    spec: Callable[[List[int]], Dict[str, Any]]
    compute: Callable[[Dict[str, Any], Path], Dict[str, Any]]
    render: Callable[[Dict[str, Any], Dict[str, Dict[str, Any]], Path], str]
    needs: tuple = ()
    version: int = 1


def non_defaults(value: Any) -> Any:
    """A config's values that differ from their fields' defaults, recursively: a key added to the
    config later (with a default that keeps the old behaviour) leaves the spec as it was.

    Example::

        >>> from engagerec.config import FeatureConfig
        >>> non_defaults(FeatureConfig(name="history", kind="history", length=20))
        {'name': 'history', 'kind': 'history'}
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {}
        for f in dataclasses.fields(value):
            current = getattr(value, f.name)
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = dataclasses.MISSING
            if current != default:
                out[f.name] = non_defaults(current)
        return out
    if isinstance(value, (list, tuple)):
        return [non_defaults(v) for v in value]
    if isinstance(value, dict):
        return {k: non_defaults(v) for k, v in value.items()}
    return value


def config_spec(cfg: ExperimentConfig) -> Dict[str, Any]:
    """A config as a spec: its values that differ from the defaults (``non_defaults``; the
    prepared directory left out: where files go does not change a number) and the digests of
    the source files it reads.

    Args:
        cfg: a loaded config.

    Example::

        >>> from engagerec.config import load_config
        >>> spec = config_spec(load_config("synthetic_study", ["train.epochs=3"]))
        >>> spec["config"]["train"], spec["files"]  # generated data: no source files
        ({'epochs': 3}, {})
    """
    values = non_defaults(cfg)
    values.get("train", {}).pop("data_dir", None)
    source = cfg.data.source
    files = {}
    for name in ("interactions", "users", "content"):
        path = getattr(source, name, None)
        if isinstance(path, str) and Path(path).is_file():
            files[path] = file_digest(path)
        elif isinstance(path, str) and Path(path).is_dir():  # a table written as several files
            files[path] = {str(f): file_digest(f) for f in sorted(Path(path).rglob("*")) if f.is_file()}
    return {"config": values, "files": files}


def prepared(cfg: ExperimentConfig, data_dir: Path) -> ExperimentConfig:
    """``cfg`` prepared into ``data_dir`` (its output kept out of the console), reading from there.

    Args:
        cfg: the experiment whose ``data`` section is prepared.
        data_dir: where the prepared data goes.

    Returns:
        ``cfg`` with ``train.data_dir`` set to ``data_dir``.

    Example::

        >>> import tempfile
        >>> from engagerec.config import load_config
        >>> cfg = prepared(load_config("synthetic_study", ["data.source.synthetic.num_rows=2000"]),
        ...                Path(tempfile.mkdtemp()))
        >>> (Path(cfg.train.data_dir) / "schema.json").is_file()
        True
    """
    from engagerec.data.prepare import prepare

    with contextlib.redirect_stdout(io.StringIO()):
        prepare(cfg.data, data_dir)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, data_dir=str(data_dir)))


def mean_ci(values) -> Dict[str, float]:
    """{mean, ci95, n} of a list of per-seed values (Student's t interval).

    Example::

        >>> round(mean_ci([0.1, 0.2, 0.3])["mean"], 4), mean_ci([0.5])["ci95"]
        (0.2, 0.0)
    """
    from engagerec_study.report import ci95

    array = np.asarray(values, dtype=float)
    return {"mean": float(array.mean()), "ci95": ci95(array), "n": int(len(array))}


def cell(stats: Dict[str, float], digits: int = 4) -> str:
    """``mean ± ci`` for a table; the value alone from one seed, which has no interval.

    Example::

        >>> cell({"mean": 0.81234, "ci95": 0.0012, "n": 5}), cell({"mean": 0.5, "ci95": 0.0, "n": 1})
        ('0.8123 ± 0.0012', '0.5000')
    """
    if stats.get("n", 2) < 2:
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {stats['ci95']:.{digits}f}"


def p_text(p: float) -> str:
    """A p-value for prose: ``p < 0.001`` or ``p = 0.04``; ``p = n/a`` when undefined.

    Example::

        >>> p_text(0.00001), p_text(0.0412), p_text(float("nan"))
        ('p < 0.001', 'p = 0.041', 'p = n/a')
    """
    if not np.isfinite(p):
        return "p = n/a"
    return "p < 0.001" if p < 0.001 else f"p = {p:.2g}"
