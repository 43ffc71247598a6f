"""The users table's columns at the user's grain: one row per user until a query needs them.

Copied onto every event, a user's columns cost a log's size in rows for a table's size in
values: KuaiRand-1K's 30 user columns over 11.7M views, for 1,000 users. So the ``events``
view joins them at read time (``UserGrain.view_join``), and the writer encodes them once per
user (``encode_per_user``: vocabulary lookups, standardised numbers) into a table it joins
while streaming the shards. The keys are unique in the users table (checked when it is
loaded), so neither join adds or drops a row, and the values are those the per-row
expressions give: the same shards, byte for byte.

Each scan of the events then builds a hash table of the users table: cheap while it is far
smaller than the log (KuaiRand's 1,000 or 27,000 users); a users table close to the log's
size was not measured.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Tuple

import duckdb

from engagerec.data.raw import USER_ID
from engagerec.data.tables import quote

USER_ENCODED = "user_encoded"  # the writer's table: one row per user, its features encoded

_EVENT_COLUMN = re.compile(r'\be\.("(?:[^"]|"")*"|[A-Za-z_]\w*)')  # a column of the events (alias e)
_JOIN_ALIAS = re.compile(r"\b(j\d+)\.")  # a vocabulary join of the fitter (alias j<index>)


@dataclass(frozen=True)
class UserGrain:
    """The users table's feature columns, one row per user.

    Args:
        columns: the columns' names in the events (after any ``user_`` renaming).
        rows: a SELECT of ``__user_key`` and those columns, one row per user of the users table.
        text_keys: the log's ids and the table's differ in type, so both are compared as text.

    Example::

        grain = UserGrain(("age",), 'SELECT "user_id" AS __user_key, "age" AS "age" FROM users', False)
        con.execute(f"SELECT s.*, {', '.join(grain.view_columns())} FROM staged s {grain.view_join('s')}")
    """

    columns: Tuple[str, ...]
    rows: str
    text_keys: bool

    def key(self, alias: str) -> str:
        """The user key of the events (or staged rows) under ``alias``, as the table's keys
        are compared with it."""
        key = f"{alias}.{quote(USER_ID)}"
        return f"CAST({key} AS VARCHAR)" if self.text_keys else key

    def view_join(self, alias: str) -> str:
        """The LEFT JOIN that gives rows under ``alias`` their user's columns, as ``__users``."""
        return f"LEFT JOIN ({self.rows}) __users ON __users.__user_key = {self.key(alias)}"

    def view_columns(self) -> List[str]:
        """What the events view selects through ``view_join``: the columns, and the user's key
        in the users table as ``__user_key`` (NULL where the table lacks the user), which
        ``per_user_join`` matches."""
        return [f"__users.{quote(c)}" for c in self.columns] + ["__users.__user_key"]


def _event_columns(sql: str) -> set:
    """The events' columns an expression reads (its ``e.<column>`` references)."""
    names = set()
    for name in _EVENT_COLUMN.findall(sql):
        names.add(name[1:-1].replace('""', '"') if name.startswith('"') else name)
    return names


def _reads_users_only(sql: str, joins: List[str], columns: frozenset) -> bool:
    """Whether ``sql`` reads user columns and nothing else, through its vocabulary joins too
    (the writer passes no expression of the history table's)."""
    read = _event_columns(sql)
    for alias in _JOIN_ALIAS.findall(sql):
        read |= _event_columns(joins[int(alias[1:])])
    return bool(read) and read <= columns


def joins_used(expressions: Iterable[str], joins: List[str]) -> List[str]:
    """The vocabulary joins (``joins[k]`` has the alias ``j<k>``) that ``expressions`` read, in order.

    Example::

        >>> joins_used(["coalesce(j1.idx, 0)"], ["LEFT JOIN vocab_0 j0 ON j0.token = e.a",
        ...                                       "LEFT JOIN vocab_1 j1 ON j1.token = e.b"])
        ['LEFT JOIN vocab_1 j1 ON j1.token = e.b']
    """
    used = sorted({int(alias[1:]) for sql in expressions for alias in _JOIN_ALIAS.findall(sql)})
    return [joins[k] for k in used]


def encode_per_user(
    con: duckdb.DuckDBPyConnection,
    grain: UserGrain,
    column_types: Mapping[str, str],
    expressions: Mapping[str, str],
    joins: List[str],
) -> Dict[str, str]:
    """
    Encode, once per user, every expression that reads nothing but user columns: the table
    ``user_encoded``, ``__user_key`` and one column per expression, for every user of the users
    table and one more, of key NULL, whose columns are all NULL: what a row whose user the
    table lacks reads (``unjoined_users: keep``; such a row's ``__user_key`` is NULL).

    Args:
        con: the DuckDB connection holding the users table and the vocabularies.
        grain: the users table's columns (``Events.user_grain``).
        column_types: the events' column -> DuckDB type (``Events.columns``).
        expressions: output name -> SQL over the events (alias ``e``) and ``joins``.
        joins: the fitter's vocabulary joins (``LEFT JOIN vocab_k j<index> ON ...``).

    Returns:
        Dict[str, str]: output name -> SQL over a row's ``user_encoded`` (alias ``u``,
        ``per_user_join``), for the expressions encoded here (none: ``{}``, and no table is
        written).

    Example::

        per_user = encode_per_user(con, events.user_grain, events.columns, {"age": 'e."age" / 10'}, [])
        # per_user == {"age": "u.__u0"}
    """
    columns = frozenset(grain.columns)
    chosen = {name: sql for name, sql in expressions.items() if _reads_users_only(sql, joins, columns)}
    if not chosen:
        return {}
    aliases = {name: f"__u{i}" for i, name in enumerate(chosen)}
    select = ", ".join(f"{sql} AS {aliases[name]}" for name, sql in chosen.items())
    nulls = ", ".join(f"CAST(NULL AS {column_types[c]}) AS {quote(c)}" for c in grain.columns)
    users = f"({grain.rows}) UNION ALL (SELECT NULL AS __user_key, {nulls})"
    con.execute(
        f"CREATE OR REPLACE TABLE {USER_ENCODED} AS SELECT e.__user_key, {select} "
        f"FROM ({users}) e {' '.join(joins_used(chosen.values(), joins))}"
    )
    return {name: f"u.{alias}" for name, alias in aliases.items()}


def per_user_join(alias: str) -> str:
    """The join that gives the rows under ``alias`` (which carry the events' ``__user_key``)
    their user's row of ``user_encoded`` (alias ``u``): the NULL key's row where the users
    table lacks the user, so every row finds exactly one.

    Args:
        alias: the rows' alias in the query.

    Example::

        >>> per_user_join("e")
        'LEFT JOIN user_encoded u ON u.__user_key IS NOT DISTINCT FROM e.__user_key'
    """
    return f"LEFT JOIN {USER_ENCODED} u ON u.__user_key IS NOT DISTINCT FROM {alias}.__user_key"
