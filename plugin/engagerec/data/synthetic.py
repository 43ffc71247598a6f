"""Synthetic data with planted, known signal. Deterministic by seed; generated in chunks,
so any row count streams to parquet in bounded memory.

Two generators:

* ``study``: the study's schema (users: age, gender; content: genres, rating, duration;
  interactions: watch time, timestamp). The watch ratio is sigmoid of a score built
  from user and content latent factors, per-user genre preferences, rating, a
  duration effect and Gaussian noise; a few views are replays (ratio above 1).
* ``mmoe``: the two-task regression benchmark of Ma et al., "Modeling Task
  Relationships in Multi-task Learning with Multi-gate Mixture-of-Experts" (KDD
  2018), section 3.2, whose task correlation is set by ``task_correlation`` (p).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, Tuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from engagerec.config import SyntheticConfig
from engagerec.data.raw import RawTables, TableSource
from engagerec.errors import ConfigError

DEFAULT_CHUNK_ROWS = 1_000_000
MAX_GENRES_PER_ITEM = 3
REPLAY_PROBABILITY = 0.05


def _chunks(total: int, chunk_rows: int) -> Iterator[Tuple[int, int]]:
    for index, start in enumerate(range(0, total, chunk_rows)):
        yield index, min(chunk_rows, total - start)


# ------------------------------------------------------------------ study schema


@dataclass
class StudyWorld:
    """The hidden truth behind the study-schema generator."""

    users: pd.DataFrame
    content: pd.DataFrame
    user_factors: np.ndarray  # [U, d]
    content_factors: np.ndarray  # [C, d]
    genre_preference: np.ndarray  # [U, G]
    content_genres: np.ndarray  # [C, MAX_GENRES_PER_ITEM], -1 = none
    log_duration_mean: float


def study_world(cfg: SyntheticConfig) -> StudyWorld:
    """Draw the users and content tables, and the factors and genre preferences behind them, from
    ``cfg.seed``; every chunk of interactions then draws from this one world."""
    rng = np.random.default_rng([cfg.seed, 0])
    n_users, n_items, n_genres = cfg.num_users, cfg.num_contents, cfg.num_genres
    genre_popularity = rng.dirichlet(np.ones(n_genres))
    counts = rng.integers(1, MAX_GENRES_PER_ITEM + 1, size=n_items)
    genres = np.full((n_items, MAX_GENRES_PER_ITEM), -1, dtype=np.int64)
    for slot in range(MAX_GENRES_PER_ITEM):  # without replacement within an item
        draw = rng.choice(n_genres, size=n_items, p=genre_popularity)
        taken = (genres == draw[:, None]).any(axis=1)
        genres[:, slot] = np.where((slot < counts) & ~taken, draw, -1)
    genre_text = [",".join(str(g) for g in row if g >= 0) for row in genres]
    log_duration_mean = np.log(60.0)
    duration = np.round(np.exp(rng.normal(log_duration_mean, 0.8, size=n_items)), 1) + 1.0
    users = pd.DataFrame(
        {
            "user_id": np.arange(n_users),
            "age": rng.integers(18, 71, size=n_users),
            "gender": rng.choice(np.array(["F", "M"]), size=n_users),
        }
    )
    content = pd.DataFrame(
        {
            "content_id": np.arange(n_items),
            "genres": genre_text,
            "rating": np.round(rng.uniform(1, 5, size=n_items), 1),
            "duration": duration,
        }
    )
    return StudyWorld(
        users=users,
        content=content,
        user_factors=rng.normal(size=(n_users, cfg.latent_dim)),
        content_factors=rng.normal(size=(n_items, cfg.latent_dim)),
        genre_preference=rng.normal(0, 0.7, size=(n_users, n_genres)),
        content_genres=genres,
        log_duration_mean=float(log_duration_mean),
    )


def study_interactions(
    world: StudyWorld, cfg: SyntheticConfig, chunk: int, rows: int, first_row: int
) -> pd.DataFrame:
    """One chunk of interactions; the same (seed, chunk) always gives the same rows."""
    rng = np.random.default_rng([cfg.seed, 1, chunk])
    # skewed activity and popularity, as in real logs
    user = np.minimum((rng.random(rows) ** 2 * cfg.num_users).astype(np.int64), cfg.num_users - 1)
    item = np.minimum((rng.random(rows) ** 3 * cfg.num_contents).astype(np.int64), cfg.num_contents - 1)
    affinity = np.einsum("ij,ij->i", world.user_factors[user], world.content_factors[item]) / np.sqrt(
        cfg.latent_dim
    )
    item_genres = world.content_genres[item]
    has = item_genres >= 0
    preference = np.where(has, world.genre_preference[user[:, None], np.maximum(item_genres, 0)], 0.0)
    preference = preference.sum(axis=1) / np.maximum(has.sum(axis=1), 1)
    rating = world.content["rating"].to_numpy()[item]
    duration = world.content["duration"].to_numpy()[item]
    score = (
        affinity
        + preference
        + 0.3 * (rating - 3.0)
        - 0.6 * (np.log(duration) - world.log_duration_mean)
        + 0.5
        + cfg.noise * rng.normal(size=rows)
    )
    ratio = 1.0 / (1.0 + np.exp(-score))
    replay = rng.random(rows) < REPLAY_PROBABILITY
    ratio = np.where(replay, ratio * rng.uniform(1.0, 2.0, size=rows), ratio)
    timestamp = 1_650_000_000_000 + (first_row + np.arange(rows)) * 1_000 + rng.integers(0, 1_000, size=rows)
    return pd.DataFrame(
        {
            "user_id": user,
            "content_id": item,
            "watch_time": np.round(ratio * duration, 2),
            "timestamp": timestamp,
        }
    )


def iter_study_interactions(
    world: StudyWorld, cfg: SyntheticConfig, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> Iterator[pd.DataFrame]:
    """Yield ``cfg.num_rows`` interactions in chunks of at most ``chunk_rows`` rows, so the whole log
    is never in memory."""
    for index, rows in _chunks(cfg.num_rows, chunk_rows):
        yield study_interactions(world, cfg, index, rows, index * chunk_rows)


def write_study_tables(
    out_dir: str | Path, cfg: SyntheticConfig, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> Path:
    """users.parquet, content.parquet and interactions.parquet, written chunk by chunk."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    world = study_world(cfg)
    pq.write_table(pa.Table.from_pandas(world.users, preserve_index=False), out_dir / "users.parquet")
    pq.write_table(pa.Table.from_pandas(world.content, preserve_index=False), out_dir / "content.parquet")
    tmp = out_dir / ".interactions.parquet.tmp"
    writer = None
    for frame in iter_study_interactions(world, cfg, chunk_rows):
        table = pa.Table.from_pandas(frame, preserve_index=False)
        writer = writer or pq.ParquetWriter(tmp, table.schema)
        writer.write_table(table, row_group_size=min(chunk_rows, 1 << 20))
    writer.close()
    tmp.replace(out_dir / "interactions.parquet")
    return out_dir


# ------------------------------------------------------------ MMoE (Ma et al. 2018)


def mmoe_parameters(cfg: SyntheticConfig) -> Dict[str, np.ndarray]:
    """Two orthogonal unit vectors u1, u2; w1 = u1, w2 = p*u1 + sqrt(1-p^2)*u2 (scale c = 1);
    sinusoid shapes alpha_i, beta_i for i = 1..m."""
    if not -1 <= cfg.task_correlation <= 1:
        raise ConfigError(f"task_correlation must be in [-1, 1], got {cfg.task_correlation}")
    rng = np.random.default_rng([cfg.seed, 0])
    basis, _ = np.linalg.qr(rng.normal(size=(cfg.input_dim, 2)))
    u1, u2 = basis[:, 0], basis[:, 1]
    p = cfg.task_correlation
    return {
        "w1": u1,
        "w2": p * u1 + np.sqrt(1 - p * p) * u2,
        "alpha": rng.normal(size=cfg.num_sin),
        "beta": rng.normal(size=cfg.num_sin),
    }


def mmoe_chunk(
    params: Dict[str, np.ndarray], cfg: SyntheticConfig, chunk: int, rows: int
) -> Tuple[np.ndarray, np.ndarray]:
    """x ~ N(0, I); y_k = w_k.x + sum_i sin(alpha_i w_k.x + beta_i) + eps, eps ~ N(0, 0.01)."""
    rng = np.random.default_rng([cfg.seed, 1, chunk])
    x = rng.normal(size=(rows, cfg.input_dim)).astype(np.float32)
    labels = []
    for w in (params["w1"], params["w2"]):
        z = x.astype(np.float64) @ w
        y = (
            z
            + np.sin(np.outer(z, params["alpha"]) + params["beta"]).sum(axis=1)
            + rng.normal(0, 0.1, size=rows)
        )
        labels.append(y)
    return x, np.stack(labels, axis=1).astype(np.float32)


def mmoe_arrays(cfg: SyntheticConfig, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Tuple[np.ndarray, np.ndarray]:
    """(x [N, input_dim], y [N, 2]) in memory."""
    params = mmoe_parameters(cfg)
    parts = [mmoe_chunk(params, cfg, i, rows) for i, rows in _chunks(cfg.num_rows, chunk_rows)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def write_mmoe_table(out_dir: str | Path, cfg: SyntheticConfig, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Path:
    """interactions.parquet with dense x0..x{d-1} and labels y1, y2, written chunk by chunk."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    params = mmoe_parameters(cfg)
    names = [f"x{i}" for i in range(cfg.input_dim)]
    tmp = out_dir / ".interactions.parquet.tmp"
    writer = None
    for index, rows in _chunks(cfg.num_rows, chunk_rows):
        x, y = mmoe_chunk(params, cfg, index, rows)
        table = pa.table({**{n: x[:, i] for i, n in enumerate(names)}, "y1": y[:, 0], "y2": y[:, 1]})
        writer = writer or pq.ParquetWriter(tmp, table.schema)
        writer.write_table(table, row_group_size=min(chunk_rows, 1 << 20))
    writer.close()
    tmp.replace(out_dir / "interactions.parquet")
    return out_dir


def synthetic_tables(cfg: SyntheticConfig, directory: str | Path) -> RawTables:
    """Generate ``cfg``'s data as parquet files in ``directory`` and say where they are: the
    synthetic adapter, so generated data goes through the same dataset writer as real data.

    ``study`` gives the three study tables; ``mmoe`` gives one table of dense inputs x0..x{d-1}
    and regression labels y1, y2 (name them in ``data.labels`` with ``column``).
    """
    directory = Path(directory)
    if cfg.kind == "study":
        write_study_tables(directory, cfg)
        return RawTables(
            TableSource(
                "interactions",
                [str(directory / "interactions.parquet")],
                required=("user_id", "content_id", "watch_time"),
            ),  # fmt: skip
            TableSource("users", [str(directory / "users.parquet")], required=("user_id",)),
            TableSource("content", [str(directory / "content.parquet")], required=("content_id",)),
        )
    if cfg.kind == "mmoe":
        write_mmoe_table(directory, cfg)
        return RawTables(TableSource("interactions", [str(directory / "interactions.parquet")]))
    raise ConfigError(f"unknown synthetic kind '{cfg.kind}', expected study or mmoe")
