# Two commands: `make demo` and `make test`. Each builds .venv from pyproject.toml when it is
# missing or older than pyproject.toml or requirements.lock, then runs. requirements.lock pins the
# versions the suite last passed with: pip's resolver otherwise backtracks for many minutes over this
# stack (ray, torch, boto3/aiobotocore for s3fs and moto). Refresh it with
#   .venv/bin/python -m pip freeze --exclude-editable | grep -v '^fetaliqa' > requirements.lock
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean

$(STAMP): pyproject.toml requirements.lock
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet -c requirements.lock -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python -m jobs.demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest

clean:
	rm -rf $(VENV) out
