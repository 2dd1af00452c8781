# One command each: `make setup`, `make test`, `make demo`.
PYTHON     ?= python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
# The CPU build lies on these machines' disk; on a GPU workstation use e.g. TORCH_SPEC='torch==2.11.0'.
TORCH_SPEC ?= torch==2.13.0
# Mesa's headless renderers; envs/rendering.py names the same packages (and the NVIDIA route) in its error.
RENDER_PKGS := libegl1 libegl-mesa0 libgl1-mesa-dri libgl1 libglib2.0-0 libosmesa6
TEST_PKGS   := chromium fonts-dejavu-core

.PHONY: setup test demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	scripts/system-deps.sh $(RENDER_PKGS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

test: setup
	scripts/system-deps.sh $(TEST_PKGS)
	$(PY) -m pytest -q

demo: setup
	$(PY) -m runners.sweep +experiment=demo

clean:
	rm -rf $(VENV)
