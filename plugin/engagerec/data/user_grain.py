"""The users table's columns at the user's grain: one row per user until a query needs them.

Copied onto every event, a user's columns cost a log's size in rows for a table's size in
values: KuaiRand-1K's 30 user columns over 11.7M views, for 1,000 users. So the ``events``
view joins them at read time (``UserGrain.view_join``), and the writer encodes them once per
user the events hold (``encode_per_user``: vocabulary lookups, standardised numbers) into a
table it joins while streaming the shards. Which columns read the users table is what the
fitter recorded as it wrote their SQL (``Fitter.reads``), never read off the SQL. The keys are
unique in the users table (checked when it is loaded), so neither join adds or drops a row,
and the values are those the per-row expressions give: the same shards, byte for byte.

Each scan of the events then builds a hash table of the users table: cheap while it is far
smaller than the log (KuaiRand's 1,000 or 27,000 users); a users table close to the log's
size was not measured.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Tuple

import duckdb

from engagerec.data.fitting import Reads
from engagerec.data.raw import USER_ID
from engagerec.data.tables import quote

USER_ENCODED = "user_encoded"  # the writer's table: one row per user, its features encoded


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


def joins_used(reads: Iterable[Reads], joins: List[str]) -> List[str]:
    """The vocabulary joins (``joins[k]``, alias ``j<k>``) that columns reading ``reads`` need, in order.

    Example::

        >>> joins_used([Reads("b", (1,)), Reads("a")], ["LEFT JOIN vocab_0 j0 ON j0.token = e.a",
        ...                                             "LEFT JOIN vocab_1 j1 ON j1.token = e.b"])
        ['LEFT JOIN vocab_1 j1 ON j1.token = e.b']
    """
    return [joins[k] for k in sorted({k for read in reads for k in read.joins})]


def read_per_user(grain: UserGrain, names: Iterable[str], reads: Mapping[str, Reads]) -> List[str]:
    """The ``names`` whose SQL reads a user column, in order: what ``encode_per_user`` encodes.
    An expression reads one column, so one that reads a user column reads nothing else.

    Example::

        >>> grain = UserGrain(("age",), "SELECT ...", False)
        >>> read_per_user(grain, ["age", "rating"], {"age": Reads("age"), "rating": Reads("rating")})
        ['age']
    """
    return [name for name in names if reads[name].column in grain.columns]


def encode_per_user(
    con: duckdb.DuckDBPyConnection,
    grain: UserGrain,
    column_types: Mapping[str, str],
    expressions: Mapping[str, str],
    reads: Mapping[str, Reads],
    joins: List[str],
    keys: str = "events",
) -> Dict[str, str]:
    """
    Encode, once per user, every expression that reads a user column: the table
    ``user_encoded``, ``__user_key`` and one column per expression, for every user the events
    hold and one more, of key NULL, whose columns are all NULL: what a row whose user the table
    lacks reads (``unjoined_users: keep``; such a row's ``__user_key`` is NULL).

    Only the users the events hold: a user without a kept row is never evaluated, as it never
    was per row (its values may not even convert: an id space's type, a FLOAT's range).

    Args:
        con: the DuckDB connection holding the ``events`` view and the vocabularies.
        grain: the users table's columns (``Events.user_grain``).
        column_types: the events' column -> DuckDB type (``Events.columns``).
        expressions: output name -> SQL over the events (alias ``e``) and ``joins``.
        reads: output name -> what its SQL reads (``Fitter.reads``; ``read_per_user``).
        joins: the fitter's vocabulary joins (``LEFT JOIN vocab_k j<index> ON ...``).
        keys: a table or view whose ``__user_key`` column holds the events' users (the writer
            passes its ``encoded`` table, already written, rather than scan the events again).

    Returns:
        Dict[str, str]: output name -> SQL over a row's ``user_encoded`` (alias ``u``,
        ``per_user_join``), for the expressions encoded here (none: ``{}``, and no table is
        written).

    Example::

        per_user = encode_per_user(con, events.user_grain, events.columns, {"age": 'e."age" / 10'},
                                   {"age": Reads("age")}, [])
        # per_user == {"age": "u.__u0"}
    """
    chosen = read_per_user(grain, expressions, reads)
    if not chosen:
        return {}
    aliases = {name: f"__u{i}" for i, name in enumerate(chosen)}
    select = ", ".join(f"{expressions[name]} AS {aliases[name]}" for name in chosen)
    nulls = ", ".join(f"CAST(NULL AS {column_types[c]}) AS {quote(c)}" for c in grain.columns)
    users = (
        f"(SELECT * FROM ({grain.rows}) WHERE __user_key IN (SELECT __user_key FROM {keys})) "
        f"UNION ALL (SELECT NULL AS __user_key, {nulls})"
    )
    used = joins_used([reads[name] for name in chosen], joins)
    con.execute(
        f"CREATE OR REPLACE TABLE {USER_ENCODED} AS SELECT e.__user_key, {select} "
        f"FROM ({users}) e {' '.join(used)}"
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
