# The only set-up: `make demo` and `make test` each install everything from a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
TORCHREC := torchrec==1.8.0

.PHONY: install demo lint format test test-fast cpp-client bench bench-scale bench-shapes bench-quality results clean

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	# torchrec's metadata requires the CUDA fbgemm-gpu; its real needs are in requirements.txt.
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps $(TORCHREC)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

DEMO_TOWERS := cross_stitch,mmoe,ple,shared_bottom,single_task

demo: install
	$(PY) -m engagerec prepare --config configs/kuairand_stats.yaml
	$(PY) -m engagerec compare --config configs/kuairand_stats.yaml --towers $(DEMO_TOWERS) --seeds 0,1,2,3,4 --no-resume --gbdt

# docs/RESULTS.md and docs/figures/ from docs/section_cache/ (engagerec_study.sections): only sections whose
# configs, towers, seeds or data changed are recomputed (all of them: about an hour on 2 cores)
results: install
	$(PY) -m engagerec results

# ruff: the formatter's check and the linter (config in pyproject.toml); `make format` fixes.
lint: install
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# the tests, and the runnable examples in the docstrings of every module of both packages (a new module's too)
DOCTESTED := plugin/engagerec plugin/engagerec_study

# pytest-xdist workers (one thread each); every test runs on whichever worker is free. Three on two
# cores: the workers often wait on processes they start (torchrun ranks, the GBDT's fits), and a
# third kept the cores busy (make test: 4m10s with two workers, 3m22s to 3m38s with three, here)
TEST_WORKERS ?= 3
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal

test: install lint
	$(PYTEST) tests --doctest-modules $(DOCTESTED)

# the inner loop: the tests not marked slow (each under about 3 s), without the docstring examples
test-fast: install
	$(PYTEST) tests -m "not slow"

# the C++ client of the AOTInductor package `engagerec export --aoti` writes: g++ (installed with
# apt when the machine has none) against the libtorch inside the installed torch wheel
CPP_CLIENT := build/cpp/score_raw

cpp-client: $(CPP_CLIENT)

$(CPP_CLIENT): clients/cpp/score_raw.cpp $(STAMP)
	@command -v g++ >/dev/null || (apt-get update -qq && apt-get install -y -qq g++)
	mkdir -p $(dir $@)
	set -e; TORCH=$$($(PY) -c "import os, torch; print(os.path.dirname(torch.__file__))"); \
	ABI=$$($(PY) -c "import torch; print(int(torch.compiled_with_cxx11_abi()))"); \
	g++ -std=c++20 -O2 -D_GLIBCXX_USE_CXX11_ABI=$$ABI $< -o $@ \
		-I$$TORCH/include -I$$TORCH/include/torch/csrc/api/include \
		-L$$TORCH/lib -Wl,-rpath,$$TORCH/lib -ltorch -ltorch_cpu -lc10

bench: install
	$(PY) benchmarks/prepare_scale.py --scales 0.1 1
	$(PY) benchmarks/reader_throughput.py
	$(PY) benchmarks/train_throughput.py --batch-size 4096 --steps 60
	# FBGEMM's two CPU backward paths on KuaiRand-1K's history table (train.embedding_backward)
	$(PY) benchmarks/backward_paths.py
	# the same three sides at KuaiRand-1K shape (a 1.9M-row video table), from generated files
	$(PY) -m engagerec synthesize --shape kuairand-1k --scale 1 --out generated/kuairand_1k
	$(PY) -m engagerec prepare --config configs/kuairand_1k.yaml
	# the same preparation with each DuckDB statement timed: the costliest, and peak RSS (compare at 5x)
	$(PY) benchmarks/prepare_queries.py --data generated/kuairand_1k --out generated/prepare_queries
	rm -rf generated/prepare_queries
	# the same preparation twice: whether the two are the same bytes (exact sums in any row order)
	$(PY) benchmarks/prepare_twice.py --data generated/kuairand_1k --out generated/prepare_twice
	$(PY) benchmarks/train_throughput.py --config configs/kuairand_1k.yaml --data-dir prepared/kuairand_1k \
		--section train_kuairand_1k --towers mmoe --batch-size 4096 --steps 40 --warmup 5
	# engagerec train as shipped: where a step's time goes, malloc defaults against engagerec's setting
	$(PY) benchmarks/profile_train.py --config configs/kuairand_1k.yaml --data-dir prepared/kuairand_1k
	# the speed levers side by side with their validation check (3 seeds): float32 against the bf16
	# tower, the history read from the video's table instead of its own, and 2 ranks
	$(PY) benchmarks/train_levers.py --data-dir prepared/kuairand_1k --rounds 5 --section train_levers_history
	# evaluation's memory against the rows of a split (10^5 to 10^7): held and peak bytes a row
	$(PY) benchmarks/eval_memory.py --rows 100000 1000000 10000000
	# video tables of 10^5 to 10^8 rows, end to end from shards, beside the plain references;
	# per-rank table memory on 1 process and 2 gloo ranks; a plot
	$(PY) benchmarks/scale.py --rows 100000 1000000 10000000 100000000
	# engagerec.host_memory's effect at 10^7 rows: glibc defaults against the setting, model alone and from shards
	ENGAGEREC_MALLOC_TUNING=0 $(PY) benchmarks/scale.py --rows 10000000 --source prebuilt --dense-max-rows 0 \
		--no-memory --section scale_10m_prebuilt_malloc_defaults
	$(PY) benchmarks/scale.py --rows 10000000 --source prebuilt --dense-max-rows 0 --no-memory \
		--section scale_10m_prebuilt_malloc_tuned
	ENGAGEREC_MALLOC_TUNING=0 $(PY) benchmarks/scale.py --rows 10000000 --dense-max-rows 0 --no-memory \
		--section scale_10m_malloc_defaults
	$(PY) benchmarks/scale.py --rows 10000000 --dense-max-rows 0 --no-memory --section scale_10m_malloc_tuned
	# at 10^7 rows, 5 rounds, with the spread of the paired ratio: the history sharing the video table
	# (FBGEMM's scalar CPU backward for a table read by two features), then in a table of its own on every side
	$(PY) benchmarks/scale.py --rows 10000000 --dense-max-rows 0 --repeats 5 --steps 60 --no-memory \
		--section scale_10m_batched_mixture
	$(PY) benchmarks/scale.py --rows 10000000 --dense-max-rows 0 --repeats 5 --steps 60 --no-memory \
		--history-table --section scale_10m_history_table

# KuaiRand-1K-shaped data end to end at 0.1x, 1x and 5x (58.6M rows): synthesize, prepare, one
# epoch of engagerec train with its evaluation; time, peak RSS, disk, test quality; a plot
bench-scale: install
	$(PY) benchmarks/end_to_end_scale.py --scales 0.1 1 5

# the same at scale 1 on three data shapes: a strong head, the default, a flat popularity (kept in
# generated/shapes, about 11 GB); then where a step's time goes on the default and the flat shape
bench-shapes: install
	$(PY) benchmarks/end_to_end_scale.py --scales 1 --skews 1.3 1.05 0.65 --keep generated/shapes
	$(PY) benchmarks/profile_train.py --compare data --rounds 3 --section profile_shapes \
		--data-dir generated/shapes/prepared_1_skew1.05 generated/shapes/prepared_1_skew0.65

# quality at KuaiRand-1K scale, 5 seeds against the GBDT, on the data `make bench` generates and prepares;
# then the levers chosen on validation (dot interactions, widths, learning rates, epochs), and the
# chosen config (configs/kuairand_1k_dots.yaml) tested the same way, its validation runs read back;
# then a one-seed screen of further levers, and where the test error lies (explainable_bound); then the
# factors config (configs/kuairand_1k_factors.yaml): its screen, what its tables hold (factor_recovery),
# 5 seeds against the GBDT and where its error lies; then its next levers, and the genre config
# (configs/kuairand_1k_factors_genre.yaml) chosen on validation and tested the same way (about 9 h in all)
KUAIRAND_1K := --data-dir prepared/kuairand_1k --noise-floor generated/kuairand_1k/noise_floor.json
KUAIRAND_1K_GENRE := --data-dir prepared/kuairand_1k_factors_genre --noise-floor generated/kuairand_1k/noise_floor.json
LEVERS := runs/quality_levers
bench-quality: install
	$(PY) benchmarks/quality_at_scale.py $(KUAIRAND_1K)
	$(PY) benchmarks/quality_levers.py $(KUAIRAND_1K) --runs $(LEVERS) --variants "as shipped" \
		"dot interactions" "dot interactions, sparse lr 0.03" "dot interactions, sparse lr 0.1" \
		"dot interactions, id embeddings 32 wide" "dot interactions, id embeddings 32 wide, sparse lr 0.1"
	$(PY) benchmarks/quality_levers.py $(KUAIRAND_1K) --runs $(LEVERS) --seeds 0 \
		--variants "dot interactions, up to 3 epochs" --section quality_levers_epochs
	$(PY) benchmarks/quality_at_scale.py $(KUAIRAND_1K) --config configs/kuairand_1k_dots.yaml \
		--section quality_at_scale_dots --runs $(LEVERS)/dot_interactions_id_embeddings_32_wide_sparse_lr_0.1
	$(PY) benchmarks/quality_levers.py $(KUAIRAND_1K) --runs $(LEVERS) --seeds 0 --section quality_levers_screen \
		--variants "dot interactions, id embeddings 32 wide, sparse lr 0.1" \
		"dot interactions, id embeddings 32 wide, sparse lr 0.3" "dot interactions, id embeddings 64 wide, sparse lr 0.1" \
		"dot interactions, id embeddings 64 wide, sparse lr 0.3" "dots, 32 wide, sparse lr 0.1, experts 4 x [256, 64]" \
		"dots, 32 wide, sparse lr 0.1, batch 1024" "dots, 32 wide, sparse lr 0.1, linear decay" \
		"dots, 32 wide, sparse lr 0.3, linear decay" "dots, 32 wide, sparse lr 0.1, embedding l2 0.01, up to 3 epochs" \
		"dots, 32 wide, sparse lr 0.1, then up to 3 embedding-only epochs"
	$(VENV)/bin/engagerec prepare --config configs/kuairand_1k.yaml --out prepared/kuairand_1k_min5 \
		--set data.features.content_id.min_count=5 --set data.features.author_id.min_count=5
	$(PY) benchmarks/quality_levers.py --data-dir prepared/kuairand_1k_min5 \
		--noise-floor generated/kuairand_1k/noise_floor.json --runs $(LEVERS) --seeds 0 \
		--section quality_levers_min_count --variants "dots, 32 wide, sparse lr 0.1, ids seen 5+ times, up to 3 epochs"
	$(VENV)/bin/engagerec predict --run-dir $(LEVERS)/dot_interactions_id_embeddings_32_wide_sparse_lr_0.1/seed0 \
		--input prepared/kuairand_1k --split test --out $(LEVERS)/test_dots.parquet
	$(VENV)/bin/engagerec predict --checkpoint latest --input prepared/kuairand_1k --split test \
		--run-dir $(LEVERS)/dots_32_wide_sparse_lr_0.1_embedding_l2_0.01_up_to_3_epochs/seed0 --out $(LEVERS)/test_l2.parquet
	$(VENV)/bin/engagerec predict --checkpoint latest --input prepared/kuairand_1k_min5 --split test \
		--run-dir "$(LEVERS)/dots_32_wide_sparse_lr_0.1_ids_seen_5+_times_up_to_3_epochs/seed0" \
		--out $(LEVERS)/test_min5.parquet
	$(PY) benchmarks/explainable_bound.py --raw generated/kuairand_1k --model-mse 0.0624 0.0582 \
		--min-views 1 2 5 20 100 --predictions $(LEVERS)/test_dots.parquet $(LEVERS)/test_l2.parquet \
		$(LEVERS)/test_min5.parquet --names "dots config, 1 epoch" "3 epochs, embedding l2 0.01" \
		"3 epochs, ids seen 5+ times" --prepared prepared/kuairand_1k prepared/kuairand_1k prepared/kuairand_1k_min5
	$(PY) benchmarks/quality_levers.py $(KUAIRAND_1K) --runs $(LEVERS) --seeds 0 --section quality_levers_factors \
		--variants "dot interactions, id embeddings 32 wide, sparse lr 0.1" \
		"dots, 32 wide, sparse lr 0.1, element-wise adagrad" "dots, 32 wide, sparse lr 0.1, id rows start in +-0.1" \
		"dots, 32 wide, sparse lr 0.1, dot logits on the watch ratio" \
		"dots, 32 wide, sparse lr 0.1, dot logits on the watch ratio, user, video and history detached" \
		"factors, only the user detached" "factors, up to 2 epochs" "factors, 64 wide"
	$(PY) benchmarks/factor_recovery.py --raw generated/kuairand_1k --prepared prepared/kuairand_1k --mf \
		--runs $(LEVERS)/dot_interactions_id_embeddings_32_wide_sparse_lr_0.1/seed0 \
		$(LEVERS)/dots_32_wide_sparse_lr_0.1_dot_logits_on_the_watch_ratio/seed0 \
		$(LEVERS)/dots_32_wide_sparse_lr_0.1_dot_logits_on_the_watch_ratio_user_video_and_history_detached/seed0 \
		--names "dots config" "dots config, dot logits on the watch ratio" \
		"configs/kuairand_1k_factors.yaml (dot logits, user, video and history detached)"
	$(PY) benchmarks/quality_at_scale.py $(KUAIRAND_1K) --config configs/kuairand_1k_factors.yaml \
		--section quality_at_scale_factors --runs $(LEVERS)/factors
	$(VENV)/bin/engagerec predict --run-dir $(LEVERS)/factors/seed0 --input prepared/kuairand_1k --split test \
		--out $(LEVERS)/test_factors.parquet
	$(PY) benchmarks/explainable_bound.py --raw generated/kuairand_1k --min-views 1 2 5 20 100 \
		--predictions $(LEVERS)/test_dots.parquet $(LEVERS)/test_factors.parquet \
		--names "dots config, 1 epoch" "factors config, 1 epoch" --prepared prepared/kuairand_1k \
		--section explainable_bound_factors
	# the factors config's next levers on validation: first-order terms, a higher rate, wider tables
	$(PY) benchmarks/quality_levers.py $(KUAIRAND_1K) --runs $(LEVERS) --seeds 0 --section quality_levers_first_order \
		--variants "dots, 32 wide, sparse lr 0.1, dot logits on the watch ratio, user, video and history detached" \
		"factors, 64 wide" "factors, 64 wide, first-order user and video" "factors, 32 wide, first-order user and video" \
		"factors, 64 wide, sparse lr 0.3" "factors, 128 wide"
	$(PY) benchmarks/factor_recovery.py --raw generated/kuairand_1k --prepared prepared/kuairand_1k \
		--runs $(LEVERS)/dots_32_wide_sparse_lr_0.1_dot_logits_on_the_watch_ratio_user_video_and_history_detached/seed0 \
		$(LEVERS)/factors_64_wide/seed0 $(LEVERS)/factors_64_wide_first-order_user_and_video/seed0 \
		$(LEVERS)/factors_128_wide/seed0 --names "factors config (32 wide)" "factors config, 64 wide" \
		"factors config, 64 wide, first-order user and video" "factors config, 128 wide" \
		--section factor_recovery_first_order
	# the video's first genre as a feature of its own (configs/kuairand_1k_factors_genre.yaml, its own
	# preparation): its width chosen on validation, then 5 seeds on test beside the GBDT
	$(VENV)/bin/engagerec prepare --config configs/kuairand_1k_factors_genre.yaml
	$(PY) benchmarks/quality_levers.py --config configs/kuairand_1k_factors_genre.yaml $(KUAIRAND_1K_GENRE) \
		--runs $(LEVERS)/genre --seeds 0 --section quality_levers_genre \
		--variants "genre config, 64 wide" "genre config, 128 wide"
	$(PY) benchmarks/quality_at_scale.py --config configs/kuairand_1k_factors_genre.yaml $(KUAIRAND_1K_GENRE) \
		--section quality_at_scale_genre --runs $(LEVERS)/genre/genre_config_128_wide
	$(VENV)/bin/engagerec predict --run-dir $(LEVERS)/genre/genre_config_128_wide/seed0 \
		--input prepared/kuairand_1k_factors_genre --split test --out $(LEVERS)/test_genre.parquet
	$(PY) benchmarks/explainable_bound.py --raw generated/kuairand_1k --min-views 1 2 5 20 100 \
		--predictions $(LEVERS)/test_dots.parquet $(LEVERS)/test_factors.parquet $(LEVERS)/test_genre.parquet \
		--names "dots config, 1 epoch" "factors config, 1 epoch" "genre config, 1 epoch" \
		--prepared prepared/kuairand_1k prepared/kuairand_1k prepared/kuairand_1k_factors_genre \
		--section explainable_bound_genre

clean:
	rm -rf $(VENV) prepared runs
