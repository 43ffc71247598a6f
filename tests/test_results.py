"""`make results`: sections computed once and cached by what decides them, every section real
(training runs on small generated data), the document and figures rendered from the cache."""

import dataclasses
import json

import numpy as np
import pytest

from conftest import REPO
from engagerec.errors import ConfigError
from engagerec_study.sections import comparisons, correlation, ensemble, gates, make_results, threshold
from engagerec_study.sections.cache import SectionCache, spec_key
from engagerec_study.sections.common import Section
from engagerec_study.sections.document import full_spec

SMALL = ["data.source.synthetic.num_rows=3000", "train.epochs=1"]


def _counting_section(name, value, calls):
    def compute(spec, work):
        calls.append(name)
        return {"value": spec["value"], "seconds": 1.5}

    def render(data, cached, figures):
        return f"value {data['value']}"

    return Section(name, f"Section {name}", lambda seeds: {"value": value(), "seeds": seeds}, compute, render)


def test_only_sections_whose_spec_changed_are_recomputed(tmp_path):
    calls, values = [], {"a": 1, "b": 2}
    catalogue = [_counting_section(n, lambda n=n: values[n], calls) for n in ("a", "b")]
    out, cache = tmp_path / "RESULTS.md", tmp_path / "cache"
    make_results(out, cache, tmp_path / "work", seeds=[0], catalogue=catalogue)
    assert calls == ["a", "b"]
    make_results(out, cache, tmp_path / "work", seeds=[0], catalogue=catalogue)
    assert calls == ["a", "b"]  # both cached
    values["b"] = 3
    spent = make_results(out, cache, tmp_path / "work", seeds=[0], catalogue=catalogue)
    assert calls == ["a", "b", "b"] and spent["a"] == 0 and spent["b"] > 0
    make_results(out, cache, tmp_path / "work", seeds=[0, 1], catalogue=catalogue)  # seeds are spec
    assert calls == ["a", "b", "b", "a", "b"]
    make_results(out, cache, tmp_path / "work", seeds=[0, 1], sections=["a"], fresh=True, catalogue=catalogue)
    assert calls[-1] == "a" and len(calls) == 6
    text = out.read_text()
    assert "## Section a\n\nvalue 1" in text and "## Section b\n\nvalue 3" in text
    assert "| all | | 0.1 min |" in text  # wall time: the sections' seconds summed
    entry = json.loads((cache / "b.json").read_text())
    assert entry["key"] == spec_key(full_spec(catalogue[1], [0, 1])) and entry["data"]["value"] == 3
    assert "stale" not in text

    # a section rendered from the cache after its inputs changed is marked stale, not hidden
    values["a"] = 5
    make_results(out, cache, tmp_path / "work", seeds=[0, 1], sections=["b"], catalogue=catalogue)
    text = out.read_text()
    assert "(stale: inputs changed since)" in text and "**Stale**" in text and "value 1" in text
    # so is one whose computation changed (its version)
    catalogue[1] = dataclasses.replace(catalogue[1], version=2)
    make_results(out, cache, tmp_path / "work", seeds=[0, 1], sections=[], catalogue=catalogue)
    assert out.read_text().count("**Stale**") == 2 and calls == ["a", "b", "b", "a", "b", "a"]


def test_needs_are_computed_first_transitively_and_fresh_recomputes_only_what_was_named(tmp_path):
    calls, values = [], {"a": 1, "b": 2, "c": 3}
    a, b, c = (_counting_section(n, lambda n=n: values[n], calls) for n in ("a", "b", "c"))
    b = dataclasses.replace(b, needs=("a",))
    c = dataclasses.replace(c, needs=("b",))
    make_results(tmp_path / "R.md", tmp_path / "cache", tmp_path / "w", seeds=[0], sections=["c"],
                 catalogue=[c, b, a])  # fmt: skip
    assert calls == ["a", "b", "c"]
    make_results(tmp_path / "R.md", tmp_path / "cache", tmp_path / "w", seeds=[0], sections=["c"],
                 fresh=True, catalogue=[c, b, a])  # fmt: skip
    assert calls == ["a", "b", "c", "c"]


def test_unknown_sections_are_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match="unknown results sections \\['nope'\\]"):
        make_results(tmp_path / "R.md", tmp_path / "c", tmp_path / "w", sections=["nope"])


def test_a_torn_cache_entry_is_recomputed(tmp_path):
    cache = SectionCache(tmp_path)
    cache.store("a", {"x": 1}, {"v": 1})
    (tmp_path / "a.json").write_text('{"key": ')  # torn (store() itself replaces atomically)
    assert cache.load("a", {"x": 1}) is None and cache.load_any("a") is None


@pytest.mark.slow
def test_the_real_sections_compute_and_render_on_small_data(tmp_path):
    catalogue = [
        comparisons.comparison_section(
            "multitask", "Small comparison", "synthetic_study", "About.", towers=["mmoe", "ple"],
            overrides=SMALL, findings=comparisons.spread_findings,
        ),
        threshold.section("synthetic_study", SMALL, cuts=(0.3,), relative=threshold.RELATIVE[:1]),
        correlation.section("synthetic_mmoe", ["data.source.synthetic.num_rows=2000", "train.epochs=1"],
                            correlations=(1.0, -0.5), towers=["shared_bottom", "mmoe"]),
        gates.SECTION,
        ensemble.section(splits=(("multitask", "synthetic_study", {"skip/auc": 0.5}),), members=2,
                         overrides=SMALL),
    ]  # fmt: skip
    out = tmp_path / "docs" / "RESULTS.md"
    make_results(out, tmp_path / "cache", tmp_path / "work", seeds=[0, 1], catalogue=catalogue)
    text = out.read_text()
    figures = {p.name for p in (tmp_path / "docs" / "figures").iterdir()}
    assert figures == {"multitask.png", "threshold.png", "correlation.png", "gates.png"}
    cached = {s.name: SectionCache(tmp_path / "cache").load_any(s.name) for s in catalogue}

    # the comparison: towers and the GBDT over both seeds, paired against the GBDT, gates read
    runs = cached["multitask"]["runs"]
    assert sorted((r["tower"], r["seed"]) for r in runs) == sorted(
        (t, s) for t in ("mmoe", "ple", "gbdt (scikit-learn)") for s in (0, 1)
    )
    assert "| mmoe vs gbdt (scikit-learn)" not in text and "- mmoe vs gbdt (scikit-learn), skip/auc:" in text
    mmoe_gates = cached["multitask"]["gates"]["mmoe"][0]["tasks"]
    assert list(mmoe_gates) == ["watch_ratio", "skip"]
    assert sum(mmoe_gates["skip"]["mean"]) == pytest.approx(1.0)
    assert cached["multitask"]["gates"]["ple"][0]["num_specific"] == 1

    # the threshold study: three ways per label; accuracy from the ratio only for a constant cut
    rows = cached["threshold"]["definitions"]
    assert [r["label"] for r in rows] == ["ratio < 0.3", "below the user's own median"]
    for row in rows:
        assert {len(row["per_seed"][w]) for w, _ in threshold.WAYS} == {2}
        assert all(0.0 <= r["auc"] <= 1.0 for w, _ in threshold.WAYS for r in row["per_seed"][w])
    assert rows[0]["per_seed"]["from_ratio"][0]["accuracy"] is not None
    assert rows[1]["per_seed"]["from_ratio"][0]["accuracy"] is None
    assert 0.0 < rows[0]["skip_rate"]["mean"] < 1.0

    # the correlation study: every tower at every correlation, over both seeds
    points = cached["correlation"]["points"]
    assert [p["correlation"] for p in points] == [1.0, -0.5]
    assert all(len(correlation.losses(p, t)) == 2 for p in points for t in ("shared_bottom", "mmoe"))

    # the ensemble: replicate r's first member is the comparison's run of seed r; the ensemble's
    # metrics are those of its members' averaged predictions; paired with both, and the GBDT
    from engagerec.runs import seed_run_dir, split_outputs

    ensembled = {
        (r["tower"], r["seed"]): r["test"] for r in cached["ensemble"]["splits"]["multitask"]["runs"]
    }
    compared = {(r["tower"], r["seed"]): r["test"] for r in runs}
    compare = tmp_path / "work" / "ensemble" / "multitask" / "compare"
    for r in (0, 1):
        assert ensembled[("mmoe", r)]["skip/auc"] == pytest.approx(
            compared[("mmoe", r)]["skip/auc"], abs=1e-4
        )
        outputs = [split_outputs(seed_run_dir(compare, "mmoe", s), "test") for s in (r, r + 2)]
        mean = (outputs[0].predictions["watch_ratio"] + outputs[1].predictions["watch_ratio"]) / 2
        mse = float(np.mean((mean - outputs[0].labels["watch_ratio"]) ** 2))
        assert ensembled[("mmoe, mean of 2 seeds", r)]["watch_ratio/mse"] == pytest.approx(mse, rel=1e-9)
        assert mse != pytest.approx(ensembled[("mmoe", r)]["watch_ratio/mse"], rel=1e-6)  # two models differ
    assert "- mmoe, mean of 2 seeds vs mmoe (one seed), watch_ratio/mse:" in text
    # each run refitted on train + val for the epochs its validation chose, on the same test rows
    work = tmp_path / "work" / "ensemble" / "multitask"
    for seed in (0, 1, 2, 3):
        chosen = json.loads((seed_run_dir(compare, "mmoe", seed) / "results.json").read_text())
        refit = json.loads((seed_run_dir(work / "refit", "mmoe", seed) / "results.json").read_text())
        assert len(refit["history"]) == chosen["best_epoch"] + 1 and refit["seed"] == seed
        refit_outputs = split_outputs(seed_run_dir(work / "refit", "mmoe", seed), "test")
        assert np.array_equal(
            refit_outputs.labels["skip"],
            split_outputs(seed_run_dir(compare, "mmoe", seed), "test").labels["skip"],
        )
    for model in ("mmoe, refit on train + val", "mmoe, refit on train + val, mean of 2 seeds",
                  "gbdt (scikit-learn), refit on train + val"):  # fmt: skip
        assert {r for (m, r) in ensembled if m == model} == {0, 1}
        assert f"- {model} vs the same model on train only, skip/auc:" in text
    assert "- mmoe, refit on train + val vs gbdt (scikit-learn), refit on train + val, skip/auc:" in text
    assert "- mmoe, mean of 2 seeds vs gbdt (scikit-learn), skip/auc:" in text
    assert "project target skip/auc >= 0.5:" in text

    # the document: every section rendered with its table and figure
    for heading in ("## Small comparison", "## Skip threshold study", "## Task-correlation study",
                    "## Gates: how MMoE and PLE share experts between tasks"):  # fmt: skip
        assert heading in text
    assert "| ratio < 0.3 |" in text and "| -0.5 |" in text and "| mmoe: task |" in text
    assert "![gates](figures/gates.png)" in text


def test_the_din_config_file_is_the_random_split_config_with_the_sections_changes():
    from engagerec.config import load_config
    from engagerec_study.sections.common import non_defaults
    from engagerec_study.sections.document import DIN_OVERRIDES

    shipped = non_defaults(load_config(REPO / "configs" / "kuairand_din.yaml"))
    built = non_defaults(load_config(REPO / "configs" / "kuairand_random.yaml", DIN_OVERRIDES))
    assert shipped.pop("name") == "kuairand_din" and built.pop("name") == "kuairand_random"
    assert shipped == built


def _correlation_data(losses_by_point, baseline=1.0):
    """points of the correlation section from {rho: {tower: [relative loss per seed]}}."""
    points = []
    for rho, by_tower in losses_by_point.items():
        runs = [
            {"tower": t, "seed": s, "test": {"y1/mse": v * baseline, "y1/baseline_mse_train_mean": baseline}}
            for t, values in by_tower.items()
            for s, v in enumerate(values)
        ]
        points.append({"correlation": rho, "runs": runs})
    towers = list(next(iter(losses_by_point.values())))
    return {"points": points, "seeds": [0, 1, 2, 3], "towers": towers, "config": "synthetic_mmoe",
            "rows": 100, "seconds": 1.0}  # fmt: skip


def test_correlation_findings_flag_stuck_runs_leave_them_out_and_say_which_way_a_tower_moves(tmp_path):
    data = _correlation_data({
        1.0: {"shared_bottom": [0.90, 0.10, 0.11, 0.12], "mmoe": [0.10, 0.10, 0.11, 0.12]},
        -0.5: {"shared_bottom": [0.20, 0.30, 0.31, 0.33], "mmoe": [0.10, 0.11, 0.11, 0.12]},
    })  # fmt: skip
    assert correlation.learned_seeds(data, ["shared_bottom"]) == [1, 2, 3]  # seed 0 did not learn at p = 1
    text = correlation.SECTION.render(data, {}, tmp_path)
    assert (
        "did not learn (test MSE at least half the constant predictor's): shared_bottom at p = 1, seed 0"
        in text
    )
    assert "- shared_bottom: loss change from p = 1 to p = -0.5, paired by seed: grows, 0.2033" in text
    assert "n = 3" in text and "no tower's loss grows significantly" not in text
    assert "- mmoe: loss change from p = 1 to p = -0.5, paired by seed: no significant change" in text
    assert (
        "does mmoe degrade less than shared-bottom? its loss change minus shared-bottom's: degrades less"
        in text
    )


def test_goal_findings_follow_each_metrics_direction():
    stats = lambda m: {"mean": m, "ci95": 0.0, "n": 5}  # noqa: E731
    gbdt = {"watch_ratio/mse": stats(0.080), "skip/auc": stats(0.90)}  # left out: towers only
    data = {
        "summary": {
            "a": {"watch_ratio/mse": stats(0.095), "skip/auc": stats(0.81)},
            "gbdt (scikit-learn)": gbdt,
        }
    }
    lines = comparisons.goal_findings(data, {"watch_ratio/mse": 0.090, "skip/auc": 0.80})
    assert lines == ["project target watch_ratio/mse <= 0.09: not met (best tower a, 0.0950)",
                     "project target skip/auc >= 0.8: met (best tower a, 0.8100)"]  # fmt: skip


def test_versus_section_pairs_with_the_other_gbdt_only_when_it_differs():
    run = lambda tower, seed, auc: {"tower": tower, "seed": seed, "test": {"skip/auc": auc}}  # noqa: E731
    gbdt = "gbdt (scikit-learn)"
    ours = {"runs": [run("mmoe", 0, 0.81), run("mmoe", 1, 0.82), run(gbdt, 0, 0.80), run(gbdt, 1, 0.80)]}
    same = {"runs": [run("mmoe", 0, 0.80), run("mmoe", 1, 0.80), run(gbdt, 0, 0.80), run(gbdt, 1, 0.80)]}
    other = {"runs": same["runs"][:2] + [run(gbdt, 0, 0.79), run(gbdt, 1, 0.78)]}
    assert [line.split(",")[0] for line in comparisons.versus_section(ours, same, "x")] == [
        "mmoe vs mmoe of x"
    ]
    assert [line.split(",")[0] for line in comparisons.versus_section(ours, other, "x")] == [
        "mmoe vs mmoe of x", f"mmoe vs {gbdt} of x"]  # fmt: skip


STATS_CONFIGS = [
    ("configs/kuairand_stats.yaml", "configs/kuairand_random.yaml"),
    ("configs/kuairand_temporal_stats.yaml", "configs/kuairand_temporal.yaml"),
]


@pytest.mark.parametrize("stats_config, base", STATS_CONFIGS)
def test_the_stats_configs_are_their_base_without_id_embeddings_plus_outcome_statistics(stats_config, base):
    """A *_stats config is its base without the id embeddings, with the dense lr 0.003, the
    last and last-five watch ratios, every other outcome's id statistics (those outcomes as
    labels, never tasks) and, under the temporal split, live counters: nothing else differs."""
    from engagerec.config import load_config
    from engagerec_study.sections.common import non_defaults

    chosen, origin = load_config(REPO / stats_config), load_config(REPO / base)
    ids = {"user_id", "content_id", "history", "author_id"}
    scheme = {f.scheme for f in chosen.data.features if f.kind in ("target_mean", "id_count")}
    assert scheme == ({"online"} if "temporal" in stats_config else {"cross_fit"})
    kept = [f for f in chosen.data.features if f.name in {g.name for g in origin.data.features}]
    assert [dataclasses.replace(f, scheme="cross_fit", lag=0.0) for f in kept] == [
        dataclasses.replace(f, scheme="cross_fit") for f in origin.data.features if f.name not in ids
    ]
    added = chosen.data.features[len(kept) :]
    outcomes = [label.name for label in chosen.data.labels[2:]]
    assert chosen.data.labels[:2] == origin.data.labels and {"like", "click", "long_view"} <= set(outcomes)
    assert [(f.kind, f.of, f.length) for f in added[:2]] == [
        ("history_mean", "watch_ratio", n) for n in (1, 5)
    ]
    assert [(f.kind, f.column, f.of) for f in added[2:]] == [
        ("target_mean", column, outcome)
        for outcome in outcomes
        for column in ("user_id", "content_id", "author_id")
    ]
    assert [t.label for t in chosen.model.tasks] == ["watch_ratio", "skip"] and chosen.train.dense_lr == 0.003
    shipped, built = non_defaults(chosen), non_defaults(origin)
    for cfg in (shipped, built):
        (
            cfg.pop("name"),
            cfg["data"].pop("features"),
            cfg["data"].pop("labels", None),
            cfg["train"].pop("dense_lr", None),
        )
        cfg["model"].pop("tasks", None)
    assert shipped == built


def test_correlation_replicates_give_each_seed_its_own_block_of_runs():
    """Seed s of a section with r replicates runs seeds s*r .. s*r+r-1: disjoint, none lost."""
    spec = correlation.section("synthetic_mmoe", replicates=3).spec([0, 1])
    assert spec["seeds"] == [0, 1, 2, 3, 4, 5]
    assert correlation.section("synthetic_mmoe").spec([0, 1])["seeds"] == [0, 1]


@pytest.mark.slow
def test_the_replay_scores_each_day_with_the_frozen_the_warm_and_the_scratch_model(tmp_path):
    """Three days of KuaiRand train the first model; days 4 and 5 are scored by all three lines."""
    from engagerec_study.sections import replay

    catalogue = [replay.section(overrides=["train.epochs=1"], first_days=3, last_day=5)]
    out = tmp_path / "docs" / "RESULTS.md"
    make_results(out, tmp_path / "cache", tmp_path / "work", seeds=[0, 1], catalogue=catalogue)
    cached = SectionCache(tmp_path / "cache").load_any("replay")
    days = cached["days"]
    # the warm line's settings were chosen on the first days' runs only (days 2 and 3 warm-started
    # from a model of day 1), never on a scored day's rows
    runs = tmp_path / "work" / "replay" / "runs"
    for candidate, loss in cached["warm_val_loss"].items():
        tuned = [json.loads((runs / f"seed{s}" / f"tune_{candidate}_{d:02d}" / "results.json").read_text())
                 for s in (0, 1) for d in (2, 3)]  # fmt: skip
        assert loss == pytest.approx(np.mean([r["history"][r["best_epoch"]]["loss"] for r in tuned]))
        for d in (2, 3):
            data_dir = json.loads((runs / "seed0" / f"tune_{candidate}_{d:02d}" / "config.json").read_text())
            assert data_dir["train"]["data_dir"].endswith(f"tune_{d:02d}")
    assert set(cached["warm_val_loss"]) == {"first", "lr_third", "one_epoch"}
    assert cached["warm_chosen"] == min(cached["warm_val_loss"], key=cached["warm_val_loss"].get)
    assert sorted(days) == ["4", "5"]
    first, second = days["4"], days["5"]
    # day 4: every line is still the first model, on the same rows
    for line in ("warm", "scratch"):
        assert [r["mse"] for r in first[line]] == [r["mse"] for r in first["frozen"]]
    # day 5: the warm model trained on day 4 alone, the scratch model on days 1..4
    for warm, scratch, frozen in zip(second["warm"], second["scratch"], second["frozen"], strict=True):
        assert warm["samples"] < scratch["samples"]
        assert warm["mse"] != frozen["mse"] and scratch["mse"] != frozen["mse"]
        assert frozen["unseen"] > warm["unseen"] > 0  # the frozen model misses day 4's new videos too
        assert frozen["unseen_users"] >= warm["unseen_users"] >= 0
        assert warm["rows"] == frozen["rows"] == scratch["rows"]  # all of day 5, whichever line
    # both lines validate on the same rows: the last of their newest day
    import pyarrow.parquet as pq

    data = tmp_path / "work" / "replay" / "data"
    chain, scratch = (
        pq.read_table(data / name / "val").column("watch_ratio") for name in ("chain_04", "scratch_04")
    )
    assert len(chain) > 0 and chain.equals(scratch)

    # "new users", counted from the files: day 5's scored rows (its preparation's train and val
    # splits) whose user, decoded through day 5's grown vocabulary, the first model's vocabulary
    # (days 1..3's training rows) lacks; against what the frozen model's scoring reported
    def tokens(name):
        return pq.read_table(data / name / "vocabs" / "user_id.parquet").column("token").to_pylist()

    known, grown = set(tokens("chain_03")), ["(missing)", *tokens("chain_05")]  # index 0: none
    rows = np.concatenate(
        [
            pq.read_table(data / "chain_05" / split, columns=["user_id"]).column(0).to_numpy()
            for split in ("train", "val")
        ]
    )
    unseen = float(np.mean([grown[index] not in known for index in rows]))
    assert unseen > 0  # day 5 brings users days 1..3 never had
    assert [r["unseen_users"] for r in second["frozen"]] == pytest.approx([unseen, unseen])
    text = out.read_text()
    assert "| day | new videos | new users | MSE frozen |" in text
    assert "![quality against day](figures/replay.png)" in text
    assert (tmp_path / "docs" / "figures" / "replay.png").stat().st_size > 0
