# Two commands (see README):
#   make lab    set everything up and open the course in JupyterLab
#   make test   set everything up and run every test, notebooks included
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PORT   ?= 8888
# empty: `make lab` makes a fresh random token each time and prints the URL (as Jupyter does)
TOKEN  ?=
# e.g. https://download.pytorch.org/whl/cpu: install torch from that index first (the CPU build on Linux)
TORCH_INDEX ?=
JOBS   ?= 2
# each test worker (and the notebook kernels it starts) gets its share of the cores, so that the
# workers do not wait on each other's threads
THREADS ?= $(shell n=$$(( $$(nproc 2>/dev/null || echo 2) / $(JOBS) )); [ $$n -ge 1 ] && echo $$n || echo 1)

.PHONY: setup lab test test-loaded assets figures clean

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(if $(TORCH_INDEX),$(PY) -m pip install --quiet --index-url $(TORCH_INDEX) "$$(grep '^torch==' requirements.txt)",)
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (course)" >/dev/null
	touch $@

setup: $(VENV)/.installed

lab: setup
	@token="$(TOKEN)"; [ -n "$$token" ] || token=$$($(PY) -c 'import secrets; print(secrets.token_hex(24))'); \
	echo "Open the course at: http://127.0.0.1:$(PORT)/lab/tree/00_start_here.ipynb?token=$$token"; \
	exec $(VENV)/bin/jupyter lab --notebook-dir=notebooks --port=$(PORT) --ip=127.0.0.1 \
	  --IdentityProvider.token="$$token" $(if $(filter 0,$(shell id -u)),--allow-root,) \
	  notebooks/00_start_here.ipynb

test: setup
	OMP_NUM_THREADS=$(THREADS) COURSE_TEST_THREADS=$(THREADS) $(PY) -m pytest -n $(JOBS) --dist loadscope --nbval-lax --nbval-current-env -m "not loaded" tests notebooks
	$(MAKE) test-loaded

# the timing notebooks again, one at a time, beside a process that keeps one core busy
test-loaded: setup
	$(PY) -m pytest -m loaded tests/test_notebooks_loaded.py

assets: setup
	$(PY) scripts/make_assets.py

figures: setup
	$(PY) scripts/make_figures.py

clean:
	rm -rf $(VENV) .pytest_cache
