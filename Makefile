# Every target sets itself up: a fresh clone needs only python3 (>= 3.10), a C compiler and make.
#   make run    the main job: every driver through the life-cycle checks, then lkdtm refcount
#   make test   the test suite (benchmarks run once each, untimed, as correctness checks)
#   make bench  vfio-emu bench (build/bench.json, build/bench.svg), then the pytest-benchmark suite
#   make lint   ruff and mypy
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test bench lint sanitize clean

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.c csrc/*.h csrc/*.py)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

# The demo: both parts always run and print their reports.  (`vfio-emu check` itself exits
# 1 when it finds something, for scripts; here that is said in words, not as a make error.)
run: $(STAMP)
	@$(BIN)/vfio-emu check || echo "(vfio-emu check found something: see the FAIL lines and their reports above)"
	@echo
	@$(BIN)/vfio-emu lkdtm

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	@mkdir -p build
	$(BIN)/vfio-emu bench --json build/bench.json --svg build/bench.svg $(VFIO_BENCH_OPTS)
	$(BIN)/python -m pytest benchmarks --benchmark-enable $(BENCH_OPTS)

# The suite against a build of the C core under AddressSanitizer and UBSan (its own venv,
# a regular install): the first report aborts the run.  ThreadSanitizer runs in the suite
# itself (tests/shm/test_sanitizers.py).
SAN_VENV ?= .venv-sanitize
sanitize:
	test -x $(SAN_VENV)/bin/python || $(PYTHON) -m venv $(SAN_VENV)
	$(SAN_VENV)/bin/python -m pip install --quiet --disable-pip-version-check '.[test]'
	VFIO_EMU_SANITIZE=address,undefined $(SAN_VENV)/bin/python -m pip install --quiet \
	    --disable-pip-version-check --force-reinstall --no-deps .
	LD_PRELOAD=$$($${CC:-gcc} -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 \
	    UBSAN_OPTIONS=print_stacktrace=1 $(SAN_VENV)/bin/python -m pytest --capture=sys

# mypy cannot follow setuptools' editable import hook, so it reads the package
# through a symlinked vfio_emu/ tree laid out as it is installed.
lint: $(STAMP)
	$(BIN)/ruff check core plugins tests benchmarks csrc
	rm -rf build/typecheck && mkdir -p build/typecheck/vfio_emu
	ln -s $(CURDIR)/core/*.py $(CURDIR)/core/py.typed $(CURDIR)/core/shm $(CURDIR)/core/linux \
	      $(CURDIR)/core/check $(CURDIR)/core/explore build/typecheck/vfio_emu/
	ln -s $(CURDIR)/plugins build/typecheck/vfio_emu/plugins
	MYPYPATH=build/typecheck $(BIN)/mypy -p vfio_emu

clean:
	rm -rf $(VENV) $(SAN_VENV) build dist *.egg-info core/shm/*.so core/shm/_core.c core/shm/_fast.c \
	    core/_stackwalk.*
