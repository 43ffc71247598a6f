"""The sharding planner engagerec builds: on one rank TorchRec's proposers without the grid search
choose the plans TorchRec's default planner chooses, in a fraction of the time; on two ranks,
where they would not, the grid search stays."""

import logging
from types import SimpleNamespace

import pytest
import torch
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.sharding_plan import get_default_sharders

from conftest import study_run_config, video_and_history_schema
from engagerec.config import EmbeddingConfig
from engagerec.data.schema import DatasetSchema
from engagerec.distributed import Runtime, _constraints, planner_proposers, topology
from engagerec.embedding_backward import loop_tables
from engagerec.features import FeatureSpec
from engagerec.model_builder import build_model


def _plan(model, world_size, sharding, proposer):
    runtime = Runtime(rank=0, world_size=world_size, device=torch.device("cpu"), owns_group=False)
    planner = EmbeddingShardingPlanner(
        topology=topology(runtime),
        batch_size=256,
        constraints=_constraints(model, sharding, world_size, "cpu"),
        proposer=proposer,
    )
    plan = planner.plan(model, get_default_sharders())  # no process group: rank 0's own plan
    return {
        table: (option.sharding_type, option.compute_kernel, tuple(option.ranks))
        for module in plan.plan.values()
        for table, option in module.items()
    }


@pytest.mark.parametrize("sharding", [{}, {"*": ["column_wise", "table_wise", "data_parallel"]}])
def test_one_ranks_plan_is_that_of_torchrecs_default_planner_without_its_grid_search(
    study_data, sharding, caplog
):
    """A 5-table model: few enough tables that TorchRec's default planner runs its grid search
    over every combination of options (it skips it above 10,000); on one rank the greedy and
    uniform proposers alone find the same plan."""
    caplog.set_level(logging.ERROR)
    model = _model(study_data)
    ours = _plan(model, 1, sharding, planner_proposers(1))
    assert ours == _plan(model, 1, sharding, None)  # None: TorchRec's defaults, grid search first
    assert {ranks for _, _, ranks in ours.values()} == {(0,)}


def test_on_two_ranks_the_grid_search_stays_as_the_greedy_proposers_alone_would_change_the_plan(
    study_data, caplog
):
    caplog.set_level(logging.ERROR)
    model = _model(study_data)
    greedy = _plan(model, 2, {}, planner_proposers(1))
    searched = _plan(model, 2, {}, planner_proposers(2))
    assert planner_proposers(2) is None and greedy != searched  # why several ranks keep the search
    assert {ranks for _, _, ranks in searched.values()} >= {(0,), (1,)}  # tables on both ranks


def _model(data_dir):
    schema = DatasetSchema.load(data_dir)
    return build_model(schema, study_run_config(data_dir).model, torch.device("meta"))


def test_sharding_keyed_by_an_id_space_holds_for_its_features_own_tables_too():
    """train.sharding by id space: the space's table and every own table of its features
    (model.embeddings.own_table); by table name: that table alone."""
    spec = FeatureSpec.from_schema(video_and_history_schema(), EmbeddingConfig(own_table=["history"]))
    model = SimpleNamespace(tables=spec.tables)  # what _constraints reads of a MultiTaskModel
    by_space = _constraints(model, {"content_id": ["column_wise"]}, 2, "cpu")
    assert set(by_space) == {"t_content_id", "t_content_id__history"}
    assert all(c.sharding_types == ["column_wise"] for c in by_space.values())
    assert set(_constraints(model, {"t_content_id__history": ["table_wise"]}, 2, "cpu")) == {
        "t_content_id__history"
    }
    # the same with train.embedding_backward's companions on both tables
    looped = SimpleNamespace(tables=loop_tables(spec.tables, min_rows=1))
    assert [len(t.feature_names) for t in looped.tables] == [2, 2]
    assert set(_constraints(looped, {"content_id": ["column_wise"]}, 2, "cpu")) == set(by_space)
