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
    """
    Class decorator: make a tower class buildable by ``name`` from configs
    (``tower: {name: ..., ...}``) and ``build_tower``, and set its ``tower_name``. A tower is
    an nn.Module constructed as ``cls(input_dim, num_tasks, **params)`` whose forward maps
    x [B, input_dim] to a list of ``num_tasks`` tensors, and which sets ``output_dims`` to
    their widths. Accepting ``device`` (and creating its parameters there) lets it be
    built on the meta device like the built-in towers.

    Args:
        name (str): the registry key; registering the same class again is a no-op.

    Returns:
        Callable[[Type[nn.Module]], Type[nn.Module]]: the decorator; it returns the class
        unchanged but for ``tower_name``.

    Raises:
        ValueError: (from the decorator) if ``name`` is taken by another class.

    Example::

        >>> import torch
        >>> from engagerec.towers import TOWERS, build_tower, register_tower
        >>> @register_tower("doc_linear")
        ... class DocLinear(torch.nn.Module):
        ...     def __init__(self, input_dim, num_tasks, width=4, device=None):
        ...         super().__init__()
        ...         self.proj = torch.nn.Linear(input_dim, width, device=device)
        ...         self.num_tasks, self.output_dims = num_tasks, [width] * num_tasks
        ...     def forward(self, x):
        ...         h = self.proj(x)
        ...         return [h for _ in range(self.num_tasks)]
        >>> DocLinear.tower_name, build_tower("doc_linear", 6, 2, width=3).output_dims
        ('doc_linear', [3, 3])
        >>> register_tower("mmoe")(DocLinear)
        Traceback (most recent call last):
        ...
        ValueError: tower name 'mmoe' is already registered by engagerec.towers.mmoe.MMoE
        >>> del TOWERS["doc_linear"]  # leave the registry as it was
    """

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
    """
    The tower class registered as ``name``, by ``register_tower`` or, failing that, by an
    ``engagerec.towers`` entry point of an installed package (loaded on first miss).

    Args:
        name (str): the registered name, e.g. ``"mmoe"``.

    Returns:
        Type[nn.Module]: the tower class.

    Raises:
        KeyError: if no tower has that name; the message suggests the nearest one.

    Example::

        >>> from engagerec.towers import get_tower_class
        >>> get_tower_class("ple").__name__
        'PLE'
        >>> get_tower_class("mmeo")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        KeyError: "unknown tower 'mmeo'; did you mean 'mmoe'? (registered: ...)"
    """
    if name not in TOWERS:
        _load_entry_points()
    if name not in TOWERS:
        near = difflib.get_close_matches(name, list(TOWERS), n=1)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise KeyError(f"unknown tower '{name}'{hint} (registered: {', '.join(sorted(TOWERS))})")
    return TOWERS[name]


def build_tower(name: str, input_dim: int, num_tasks: int, **config: Any) -> nn.Module:
    """
    Build a registered tower: ``get_tower_class(name)(input_dim, num_tasks, **config)``, then
    check that it reports ``num_tasks`` widths in ``output_dims``. Every tower maps
    x [B, input_dim] to ``num_tasks`` representations.

    Args:
        name (str): the registered name (``"single_task"``, ``"shared_bottom"``,
            ``"cross_stitch"``, ``"mmoe"``, ``"cgc"``, ``"ple"`` or a plugin's).
        input_dim (int): number of elements in each input sample (the tower input).
        num_tasks (int): number of representations to make.
        **config (Any): the tower's other constructor arguments (a config's
            ``tower.params``), ``device`` included: every built-in tower creates its
            parameters on ``device`` (e.g. ``torch.device("meta")``).

    Returns:
        nn.Module: the tower.

    Raises:
        KeyError: if ``name`` is not registered.
        TypeError: if the tower does not set ``output_dims`` to a list of ``num_tasks`` ints.

    Example::

        >>> import torch
        >>> from engagerec.towers import build_tower
        >>> tower = build_tower("mmoe", 32, 2, num_experts=3, expert_sizes=[16], device=torch.device("meta"))
        >>> type(tower).__name__, tower.output_dims, tower.experts.weights[0].device
        ('MMoE', [16, 16], device(type='meta'))
    """
    tower = get_tower_class(name)(input_dim, num_tasks, **config)
    dims = getattr(tower, "output_dims", None)
    if not isinstance(dims, list) or len(dims) != num_tasks:
        raise TypeError(f"tower '{name}' must set output_dims to a list of {num_tasks} ints, got {dims!r}")
    return tower
