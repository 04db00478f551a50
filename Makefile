# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
DEMO_WEIGHTS ?= random

.PHONY: setup demo test lint clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	rm -rf demo
	$(PY) -m bench.corpus --kind demo --count 24 --out demo/images
	@if [ "$(DEMO_WEIGHTS)" = "random" ]; then \
	  echo "demo: using --weights random (seeded): this machine cannot download the ImageNet weights."; \
	  echo "      Where it can, run: make demo DEMO_WEIGHTS=imagenet"; fi
	$(VENV)/bin/embed-images run --input demo/images --output demo/out --weights $(DEMO_WEIGHTS)
	$(PY) -c "from pipeline import read_embeddings; \
	t = read_embeddings('demo/out'); \
	print(t.num_rows, 'rows in demo/out/embeddings; the first five:'); \
	print(t.drop_columns(['embedding', 'content_sha256']).slice(0, 5).to_pandas().to_string(index=False))"

lint: setup
	$(VENV)/bin/ruff check pipeline jobs bench tests infra
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/pytest -q

clean:
	rm -rf demo $(VENV) .pytest_cache .mypy_cache .ruff_cache
