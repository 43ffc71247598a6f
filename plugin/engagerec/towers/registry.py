"""Tower registry: ``@register_tower("name")`` here, or an entry point in another package.

Another package adds a tower without touching engagerec by declaring, in its pyproject::

    [project.entry-points."engagerec.towers"]
    my_tower = "my_package.towers:MyTower"

Configs then name it like a built-in one (``tower: {name: my_tower, ...}``).
"""

from __future__ import annotations

import difflib
from importlib.metadata import entry_points
from typing import Any, Callable, Dict, Type

from torch import nn

ENTRY_POINT_GROUP = "engagerec.towers"
TOWERS: Dict[str, Type[nn.Module]] = {}


def register_tower(name: str) -> Callable[[Type[nn.Module]], Type[nn.Module]]:
    """Class decorator: make the tower buildable by ``name`` from configs and ``build_tower``."""

    def wrap(cls: Type[nn.Module]) -> Type[nn.Module]:
        if name in TOWERS and TOWERS[name] is not cls:
            raise ValueError(
                f"tower name '{name}' is already registered by "
                f"{TOWERS[name].__module__}.{TOWERS[name].__name__}"
            )
        TOWERS[name] = cls
        cls.tower_name = name
        return cls

    return wrap


def _load_entry_points() -> None:
    for point in entry_points(group=ENTRY_POINT_GROUP):
        if point.name not in TOWERS:
            register_tower(point.name)(point.load())


def get_tower_class(name: str) -> Type[nn.Module]:
    if name not in TOWERS:
        _load_entry_points()
    if name not in TOWERS:
        near = difflib.get_close_matches(name, list(TOWERS), n=1)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise KeyError(f"unknown tower '{name}'{hint} (registered: {', '.join(sorted(TOWERS))})")
    return TOWERS[name]


def build_tower(name: str, input_dim: int, num_tasks: int, **config: Any) -> nn.Module:
    """Build a registered tower. Every tower maps x [B, input_dim] to ``num_tasks`` representations
    and reports their widths in ``output_dims``."""
    tower = get_tower_class(name)(input_dim, num_tasks, **config)
    dims = getattr(tower, "output_dims", None)
    if not isinstance(dims, list) or len(dims) != num_tasks:
        raise TypeError(f"tower '{name}' must set output_dims to a list of {num_tasks} ints, got {dims!r}")
    return tower
