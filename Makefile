# make demo: set up .venv and compare six architectures on synthetic data (a few minutes on 2 CPU cores)
# make test: the whole test suite (what CI runs)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,torchrec,track,tune]'
	$(BIN)/pip install --quiet --no-deps torchrec==1.8.0
	touch $@

demo: install
	$(BIN)/mtlrec bench configs/demo.yaml --seeds 3

test: install
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
