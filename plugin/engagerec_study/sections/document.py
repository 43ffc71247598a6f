"""docs/RESULTS.md from its sections: compute what the cache lacks, render everything."""

from __future__ import annotations

import datetime
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from engagerec.errors import ConfigError
from engagerec.machine import cpu_name, package_versions
from engagerec_study.sections import comparisons, correlation, ensemble, gates, replay, replay_ids, threshold
from engagerec_study.sections.cache import SectionCache
from engagerec_study.sections.common import TARGETS, Section

SEEDS = [0, 1, 2, 3, 4]
PACKAGES = ("torch", "fbgemm-gpu-cpu", "torchrec", "scikit-learn")  # in each section's environment
# configs/kuairand_din.yaml as changes to kuairand_random (the "ids" section), so that the two sections
# differ by exactly these (tests/test_results.py holds the file to them)
DIN_OVERRIDES = [
    "data.features.history.positions=true",  # one feature per position of the history
    "model.target_attention={history: history, candidate: content_id, hidden_sizes: [32]}",
]

SECTIONS: List[Section] = [
    comparisons.comparison_section(
        "protocol",
        "The study's protocol: its inputs only (no ids, no history), random split",
        "configs/paper_protocol.yaml",
        "The study's inputs (user activity and registration, genres, duration), learning rate 1e-4, "
        "20 epochs, batch 256: its three towers plus shared-bottom and single-task, paired against "
        "MMoE, to test its claims that the architectures differ little and that skip is barely "
        "above chance.",
        reference="mmoe",
        findings=comparisons.spread_findings,
    ),
    comparisons.comparison_section(
        "random",
        "Random split (70% train and validation, 30% test), as chosen on validation: id "
        "statistics and every pre-exposure feature, no id embeddings",
        "configs/kuairand_stats.yaml",
        "The study's random split with the configuration chosen on the validation split "
        "(docs/EXPERIMENTS.md): the user's recent outcomes (the last view's, the last 5, 20 and 200 "
        "views' watch ratio, the last 20's skip rate), leak-free id statistics (each id's other "
        "training views and the smoothed training mean of each outcome in the log: watch ratio, "
        "skip, like, click, long view, follow, comment, forward, profile visit; cross-fitted) for "
        "the user, the video and the author, and every user and video attribute, but no id "
        "embeddings: on 21,397 training rows they memorise within two epochs. Each tower is also "
        "paired with the same tower of the next section (ids and history embedded) and with that "
        "section's GBDT, which reads the ids too (target-encoded). XAUC is exact over the test split.",
        versus="ids",
        goals=TARGETS["random"],
    ),
    comparisons.comparison_section(
        "ids",
        "Random split with id embeddings and the viewing history",
        "configs/kuairand_random.yaml",
        "The same split with everything known before a view embedded: user and video ids (and "
        "the author), the 20 videos viewed before (sharing the video table), recent outcomes, the "
        "leak-free id statistics and the user and video attributes: the configuration the "
        "threshold and multi-task sections build on.",
    ),
    comparisons.comparison_section(
        "din",
        "Random split with target attention over the history (DIN)",
        "configs/kuairand_random.yaml",
        "The id-embedding section's config with the study's \"sequence-aware\" direction built in: "
        "the 20 earlier views are embedded one by one (a positional history) and the candidate "
        "video's embedding weighs each (DIN's activation unit, engagerec.attention.TargetAttention) "
        "before any tower (`configs/kuairand_din.yaml`; how it was chosen, on validation: "
        "docs/EXPERIMENTS.md). Each tower is also paired with the same tower of the id-embedding "
        "section (same seeds, same split) and with its GBDT.",
        towers=["mmoe", "ple", "single_task"],
        overrides=DIN_OVERRIDES,
        versus="ids",
    ),
    comparisons.comparison_section(
        "temporal",
        "Temporal split (the last 30% of views by time are test), as chosen on validation",
        "configs/kuairand_temporal_stats.yaml",
        "Training only on the past, with the configuration chosen on the validation split (the "
        "latest 10% of the training period; docs/EXPERIMENTS.md): the random section's inputs, "
        "but the id statistics are live counters (scheme: online: each row sees its id's views "
        "of every split that started at least five minutes before it, as a server's counters "
        "would, so they stay fresh through the test period), no id embeddings, dense learning "
        "rate 0.003. Live counters read the outcomes of earlier test-period views, which the "
        "next section's training-only statistics never do: pairing with it compares what the "
        "inputs know as well as the models. The section with "
        "ids keeps training-only ordered statistics. Each tower is also paired with the same tower of "
        "the next section (ids and history embedded) and with its GBDT.",
        versus="temporal_ids",
        goals=TARGETS["temporal"],
    ),
    comparisons.comparison_section(
        "temporal_ids",
        "Temporal split with id embeddings and the viewing history",
        "configs/kuairand_temporal.yaml",
        "The same split and ordered id statistics with the user, video and author ids and the 20 "
        "earlier views embedded (the base of configs/kuairand_1k.yaml).",
    ),
    ensemble.SECTION,
    comparisons.comparison_section(
        "multitask",
        "Four tasks at once: watch ratio, skip, long view, like (random split)",
        "configs/kuairand_multitask.yaml",
        "The watch ratio and skip (derived), long view and like (KuaiRand's `label`: 1 like, 0 "
        "hate) read from the log; the id-embedding section's features (kuairand_random). The GBDT "
        "fits one model per task. Like is easy in this subset (every row is an explicit like or "
        "hate by users filtered to many likes: datasets/README.md).",
        towers=["mmoe", "ple", "single_task"],
    ),
    threshold.SECTION,
    correlation.SECTION,
    correlation.SMALL_SECTION,
    gates.SECTION,
    replay.SECTION,
    replay_ids.SECTION,
]


def full_spec(section: Section, seeds: List[int]) -> Dict[str, Any]:
    """What decides a section's numbers: its own spec (configs' non-default values, towers, seeds,
    data digests), the section's code version, engagerec's version and the device kind."""
    import torch

    from engagerec import __version__

    device = "cuda" if torch.cuda.is_available() else "cpu"  # what train.device auto resolves to
    code = {"section": section.version, "engagerec": __version__}
    return {**section.spec(seeds), "code": code, "device": device}


def _with_needs(names: List[str], known: Dict[str, Section]) -> List[str]:
    """``names`` with every section they need, transitively, each needed one before its user."""
    ordered: List[str] = []

    def visit(name: str) -> None:
        if name in ordered:
            return
        for need in known[name].needs:
            visit(need)
        ordered.append(name)

    for name in names:
        visit(name)
    return ordered


def make_results(
    out: str | Path = "docs/RESULTS.md",
    cache_dir: str | Path = "docs/section_cache",
    work: str | Path = "runs/sections",
    sections: Optional[List[str]] = None,
    seeds: Optional[List[int]] = None,
    fresh: bool = False,
    catalogue: Optional[List[Section]] = None,
) -> Dict[str, float]:
    """
    Compute every section the cache lacks (or only ``sections``), then write ``out`` and its
    figures (``<out dir>/figures``) from the cache.

    Args:
        out: the markdown document.
        cache_dir: one JSON per section (commit it: the document renders from it alone).
        work: prepared data and runs of the sections computed now.
        sections: names to compute (default all; ``[]`` only renders), with the sections they
            need (computed first unless cached); the others render from the cache as they are,
            marked stale when their inputs changed since.
        seeds: the seeds of every section (default 0-4).
        fresh: recompute the named sections even when cached (not the ones they need).
        catalogue: the document's sections, in order (default ``SECTIONS``).

    Returns:
        Dict[str, float]: seconds spent computing each section this time (0 when cached).

    Raises:
        ConfigError: an unknown section name.
    """
    seeds = list(seeds or SEEDS)
    catalogue = SECTIONS if catalogue is None else catalogue
    known = {s.name: s for s in catalogue}
    chosen = list(known) if sections is None else list(sections)
    unknown = [name for name in chosen if name not in known]
    if unknown:
        raise ConfigError(f"unknown results sections {unknown}; known: {list(known)}")
    requested = set(chosen)
    chosen = _with_needs(chosen, known)
    cache = SectionCache(cache_dir)
    spent: Dict[str, float] = {}
    for name in chosen:
        section = known[name]
        spec = full_spec(section, seeds)
        if not (fresh and name in requested) and cache.load(name, spec) is not None:
            spent[name] = 0.0
            print(f"[results] {name}: cached", file=sys.__stdout__, flush=True)
            continue
        print(f"[results] {name}: computing", file=sys.__stdout__, flush=True)
        started = time.perf_counter()
        data = section.compute(spec, Path(work) / name)
        spent[name] = time.perf_counter() - started
        data.setdefault("seconds", spent[name])
        data["computed"] = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
        data["environment"] = f"{cpu_name()}, {os.cpu_count()} logical cores; {package_versions(PACKAGES)}"
        cache.store(name, spec, data)
    _write(Path(out), cache, catalogue, {s.name: full_spec(s, seeds) for s in catalogue})
    return spent


def _write(
    out: Path, cache: SectionCache, catalogue: List[Section], specs: Dict[str, Dict[str, Any]]
) -> None:
    figures = out.parent / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    cached = {s.name: cache.load_any(s.name) for s in catalogue}
    present = {name: data for name, data in cached.items() if data is not None}
    total = sum(data.get("seconds", 0.0) for data in present.values())
    lines = [
        "# Results",
        "",
        "Generated by `make results` (`engagerec results`): every table, finding and figure below"
        " is rendered from the section cache in `docs/section_cache/` (one JSON per section: its spec, "
        "its per-run numbers); a section is recomputed when what decides its numbers changes "
        "(configs, towers, seeds, the data files' digests, the section's code version); "
        "`engagerec results --fresh` recomputes all. Test split, used for nothing but these "
        "tables; mean ± 95% confidence interval over seeds (Student's t); p-values are per "
        "comparison (two-sided paired t-tests, 5 seeds), not corrected for the number of "
        "comparisons a section makes. KuaiRand sections: the bundled subset (datasets/kuairand, "
        "CC BY-SA 4.0; every row an explicit like or hate: see datasets/README.md for its "
        "biases). Throughput and scale are in benchmarks/RESULTS.md; experiments outside these "
        "sections (ablations, what was tried) in docs/EXPERIMENTS.md.",
        "",
        "Computed on: "
        + "; ".join(sorted({d.get("environment", "?") for d in present.values()}) or ["nothing yet"])
        + f" (Python {platform.python_version()}).",
        "",
        "| section | computed | wall time |",
        "|---|---|---:|",
    ]
    stale = {s.name for s in catalogue if s.name in present and cache.load(s.name, specs[s.name]) is None}
    for section in catalogue:
        data = present.get(section.name)
        if data is None:
            lines.append(f"| {section.title} | not yet | – |")
            continue
        when = data.get("computed", "?") + (" (stale: inputs changed since)" if section.name in stale else "")
        lines.append(f"| {section.title} | {when} | {data.get('seconds', 0):.0f} s |")
    lines += [f"| all | | {total / 60:.1f} min |", ""]
    for section in catalogue:
        lines += [f"## {section.title}", ""]
        data = present.get(section.name)
        if data is None:
            lines += [f"Not computed yet: `engagerec results --sections {section.name}`.", ""]
            continue
        if section.name in stale:
            lines += [
                "**Stale**: computed before a change to what decides its numbers; "
                f"`engagerec results --sections {section.name}` recomputes it.",
                "",
            ]
        lines += [section.render(data, present, figures).rstrip(), ""]
    out.write_text("\n".join(lines))


def results(
    out: str | Path,
    cache_dir: str | Path,
    work: str | Path,
    sections: Optional[List[str]] = None,
    seeds: Optional[List[int]] = None,
    fresh: bool = False,
) -> int:
    """``engagerec results``: ``make_results``, then one line saying what was computed and how long
    it took.

    Args:
        out: the markdown document (docs/RESULTS.md).
        cache_dir: the section cache (docs/section_cache: one JSON per section).
        work: prepared data and runs of the sections computed now.
        sections: names to compute (default all).
        seeds: the seeds of every section (default 0-4).
        fresh: recompute the named sections even when cached.

    Returns:
        int: 0.

    Raises:
        ConfigError: an unknown section name.
    """
    started = time.perf_counter()
    spent = make_results(out, cache_dir, work, sections=sections, seeds=seeds, fresh=fresh)
    computed = [name for name, seconds in spent.items() if seconds > 0]
    print(
        f"wrote {out} in {time.perf_counter() - started:.0f} s "
        f"(computed: {', '.join(computed) or 'none, all cached'})"
    )
    return 0
