"""Viewing history as SQL windows: for each event, an aggregate over the same user's views
strictly before its moment, at most ``length`` of them. The results go to a narrow table
keyed by the event's source row, which the writer joins.

Rows of one user are ordered by (timestamp, source row). A window of the ``length`` rows
before each row is exact for the first row of a moment; every row of that moment (same user,
same timestamp) then takes the first row's value, so no event sees itself or anything
simultaneous. Used for the id history (``list`` of the encoded ids) and for history_mean (the
``avg`` of a past label, known when the next video is served).
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import duckdb

from engagerec.data.errors import DataError
from engagerec.data.raw import TIMESTAMP, USER_ID
from engagerec.data.tables import quote

ORDER = "__src"  # ties within a timestamp are broken by the row's position in the log


def has_ties(con: duckdb.DuckDBPyConnection, source: str = "events") -> bool:
    """Whether any user has two views at one timestamp (then windows need a second pass)."""
    user, time = quote(USER_ID), quote(TIMESTAMP)
    return bool(
        con.execute(
            f"SELECT count(*) FROM (SELECT 1 FROM {source} GROUP BY {user}, {time} HAVING count(*) > 1)"
        ).fetchone()[0]
    )


def build_history_table(
    con: duckdb.DuckDBPyConnection,
    target: str,
    source: str,
    columns: List[Tuple[str, str, int, str]],
    ties: bool = True,
    keep: Sequence[str] = (),
) -> None:
    """``CREATE TABLE target(__src, __split, <one column per history feature>)``.

    Args:
        con: the DuckDB connection that holds ``source``'s tables.
        target: the name of the table to create (replaced if it exists).
        source: a SELECT giving ``__src``, ``__split``, ``__u`` (user), ``__t`` (time) and
            ``__v0, __v1, ...``: the values the windows aggregate, one per column.
        columns: (name, aggregate, length, value when there is no earlier view), e.g.
            ``("history", "list", 20, "[]::INTEGER[]")`` or ``("recent_skip", "avg", 20, "NULL")``.
        ties: whether a user may have several views at one timestamp; without ties the
            second window pass (first row of each moment) is skipped.
        keep: columns of ``source`` carried into ``target`` as they are (per-row values
            computed beside the windows, such as the id statistics).

    The windows run over this narrow projection, never over the wide rows: sorting those
    costs several times more and spills early under a memory limit.

    Example::

        build_history_table(con, "history", "SELECT __src, __split, user_id AS __u, timestamp AS __t, "
                            "skip AS __v0 FROM events", [("recent_skip", "avg", 20, "NULL")])
    """
    inner, outer = [], []
    by_user = f"PARTITION BY __u ORDER BY __t, {ORDER}"
    by_moment = f"PARTITION BY __u, __t ORDER BY {ORDER}"

    def at_moment(window: str, alias: str) -> str:
        """``window`` (over the user's rows) as the first row of this row's moment has it."""
        if not ties:
            return window
        inner.append(f"{window} AS {alias}")
        return f"first_value({alias}) OVER ({by_moment})"

    earlier = None  # the user's rows before this one (before its moment, with ties)
    for i, (name, aggregate, length, empty) in enumerate(columns):
        if length <= 0:
            raise DataError(f"history feature '{name}': length {length}", expected="a positive integer")
        if aggregate == "list":
            # the last `length` values from `length` lags, oldest first: scalar windows, which DuckDB
            # spills to disk; a list aggregate over the frame held every list in memory (it failed a
            # 1 GB limit at 5x the KuaiRand-1K shape)
            earlier = earlier or f"({at_moment(f'row_number() OVER ({by_user})', '__n')} - 1)"
            lags = [
                at_moment(f"lag(__v{i}, {k}) OVER ({by_user})", f"__h{i}_{k}") for k in range(length, 0, -1)
            ]
            value = f"list_slice([{', '.join(lags)}], {length + 1} - least({earlier}, {length}), {length})"
        else:
            frame = f"ROWS BETWEEN {int(length)} PRECEDING AND 1 PRECEDING"
            value = at_moment(f"{aggregate}(__v{i}) OVER ({by_user} {frame})", f"__h{i}")
        outer.append(f"coalesce({value}, {empty}) AS {quote(name)}")
    outer += [quote(name) for name in keep]
    body = f"SELECT *, {', '.join(inner)} FROM ({source})" if inner else source
    con.execute(
        f"CREATE OR REPLACE TABLE {target} AS SELECT {ORDER}, __split, {', '.join(outer)} FROM ({body})"
    )


def require_history_keys(columns, name: str) -> None:
    """History needs a user and a time order; say which is missing."""
    for key in (USER_ID, TIMESTAMP):
        if key not in columns:
            raise DataError(
                f"history feature '{name}' needs a {key} column",
                column=key,
                expected=f"data.source.columns.{key} to name it",
            )
