"""engagerec: multi-task watch-ratio and skip prediction on TorchRec.

What a TorchRec job imports, with the core install alone (loaded on first use, so that
``engagerec --help`` and the data commands do not pay for torch)::

    from engagerec import MultiTaskModel, Task, TaskConfig, TaskMetrics, build_tower, register_tower
"""

import importlib

__version__ = "0.1.0"

# public name -> the module defining it
_PUBLIC = {
    "MultiTaskModel": "engagerec.model",
    "Task": "engagerec.tasks",
    "TaskConfig": "engagerec.config",
    "TaskMetrics": "engagerec.metrics",
    "build_tower": "engagerec.towers",
    "register_tower": "engagerec.towers",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):  # PEP 562: the public names, imported when first used
    if name not in _PUBLIC:
        raise AttributeError(f"module 'engagerec' has no attribute '{name}'")
    return getattr(importlib.import_module(_PUBLIC[name]), name)
