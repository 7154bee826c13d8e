# Two commands: `make demo` and `make test`. Each builds .venv from pyproject.toml when it is
# missing or older than pyproject.toml or requirements.lock, then runs. requirements.lock pins the
# versions the suite last passed with: pip's resolver otherwise backtracks for many minutes over this
# stack (ray, torch, boto3/aiobotocore for s3fs and moto). Refresh it with
#   .venv/bin/python -m pip freeze --exclude-editable | grep -v '^fetaliqa' > requirements.lock
# The stack is installed by uv (from the registry, into the venv): measured on a 2-core machine from a
# fresh clone with empty caches, 81 s against pip's ~5 min (pip unpacks torch's CUDA wheels slowly).
# uv compiles the bytecode at install, as pip does (--compile-bytecode), so that the suite's many fresh Python
# processes (Ray workers, subprocess jobs) do not compile what they import: in a clean clone the suite took
# 1,660 s (598 tests) without it and 951 s (657 tests) with it, on the same 2-core machine (2026-12-05/06).
# Should uv fail (a registry uv cannot reach, say), pip installs the same pins.
PYTHON ?= python3
UV := uv==0.13.9
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean

$(STAMP): pyproject.toml requirements.lock
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet $(UV)
	$(VENV)/bin/uv pip install --quiet --compile-bytecode --python $(VENV)/bin/python -c requirements.lock -e '.[test]' \
	  || $(VENV)/bin/python -m pip install --quiet -c requirements.lock -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python -m jobs.demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest

clean:
	rm -rf $(VENV) out
