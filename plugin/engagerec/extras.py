"""Which optional extra installs which package, and the one-line error when one is missing.

The core install (torch, torchrec, numpy, PyYAML, tqdm) imports the towers, the model, the
tasks, the losses and the metrics; everything else is behind an extra (pyproject.toml).
"""

from __future__ import annotations

from typing import Optional

# top-level module -> the extra that installs it
EXTRA_OF_MODULE = {
    "duckdb": "data",
    "pyarrow": "data",
    "pandas": "data",
    "scipy": "data",  # engagerec synthesize's KuaiRand-shaped generator; the study's statistics
    "sklearn": "study",
    "matplotlib": "study",
    "tensorboard": "tensorboard",
    "litserve": "serve",  # engagerec serve
}


def missing_extra(err: ImportError, what: str) -> Optional[str]:
    """
    The one-line message for an ImportError of a package an extra installs, else None.

    Args:
        err (ImportError): the error (its ``name`` is the missing module).
        what (str): what needed it, e.g. ``"engagerec prepare"``.

    Returns:
        Optional[str]: e.g. ``engagerec prepare needs the data extra (duckdb is not installed):
        pip install 'engagerec[data]'``; None when no extra provides the module.

    Example::

        >>> from engagerec.extras import missing_extra
        >>> missing_extra(ModuleNotFoundError("No module named 'duckdb'", name="duckdb"), "engagerec prepare")
        "engagerec prepare needs the data extra (duckdb is not installed): pip install 'engagerec[data]'"
        >>> missing_extra(ModuleNotFoundError("No module named 'foo'", name="foo"), "x") is None
        True
    """
    module = (err.name or "").split(".")[0]
    extra = EXTRA_OF_MODULE.get(module)
    if extra is None:
        return None
    return f"{what} needs the {extra} extra ({module} is not installed): pip install 'engagerec[{extra}]'"
