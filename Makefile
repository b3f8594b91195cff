# vxnb: the two commands a newcomer needs are `make report` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
QUICK  ?=
PARAMS ?=
STAMP  := $(VENV)/.installed

.PHONY: report test test-fast venv data benchmarks clean-runs help

help:
	@echo "make report [QUICK=1] [PARAMS=my-run.yaml]  set up .venv, prepare data, run notebooks 01-06, write reports/"
	@echo "make test              set up .venv and run the test suite (includes every notebook in quick mode)"
	@echo "make test-fast         the everyday subset: no model training, notebooks, reports or browser (-m 'not slow and not browser')"
	@echo "make benchmarks        print the speed/accuracy benchmarks"
	@echo "make report NO_INPUT=1 also writes every page without its code (NN_name.no-input.html)"

# The venv is (re)installed when pyproject.toml changes. torchvision>=0.29 pulls a torch
# build from the registry that runs on the CPU (and on CUDA where present).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

data: $(STAMP)
	$(PY) -m vxnb.report --prepare-data $(if $(QUICK),--quick,) $(if $(PARAMS),--params $(PARAMS),)

report: $(STAMP)
	$(PY) -m vxnb.report $(if $(QUICK),--quick,) $(if $(PARAMS),--params $(PARAMS),) $(if $(NO_INPUT),--no-input,)

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadgroup tests

# Everyday work: everything but the tests marked slow (training, whole notebooks and reports, the
# wheel, fault injection) or browser. `make test` stays the full suite that CI runs.
test-fast: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadgroup -m "not slow and not browser" tests

benchmarks: $(STAMP)
	for f in benchmarks/bench_*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

clean-runs:
	rm -rf runs reports
