# The two commands a newcomer needs: `make demo` and `make test`.
# Each creates .venv from requirements.txt on first use, with the first tested Python it finds (the range is
# requires-python in pyproject.toml), or the one PYTHON names: make PYTHON=python3.12 demo
PYTHON ?=
VENV := .venv
PY := $(VENV)/bin/python

# make demo / baseline / compare / bench / stems settings are the notebook's names, given on the command line:
#   make demo rounds=5 algorithm=fedprox mu=0.1 data=synthetic
# Each has one default, in its home (the notebook's in workspace/medfl, the launcher's in localfed/settings.py);
# docs/settings.md lists them, and the capitalised names the README documented before (ROUNDS=5, ALGO=...) still work.
RUN = $(PY) -m localfed

.PHONY: venv demo evaluate baseline bench stems compare certs audit review approve refuse test test-pythons test-hosts lint clean hpu-deps

# Reinstalls when requirements.txt is newer than $(VENV)/.installed; recreates for another PYTHON.
venv:
	@PYTHON="$(PYTHON)" bash tools/venv.sh make $(VENV)

demo: venv
	@$(RUN) demo $(MAKEOVERRIDES)

baseline: venv
	@$(RUN) baseline $(MAKEOVERRIDES)

# A saved model (model=runs/<id>/best_model.pt) tested on every envoy's test split (split=val), nothing trained:
# runs/<time>-evaluate-<dataset>-<size>/evaluation.json, each score with its 95 % interval.
evaluate: venv
	@$(RUN) evaluate $(MAKEOVERRIDES)

# Every algorithm of `algorithms` (default "fedavg fedprox fedadam median") and the centralized baseline on the same
# data, partition (default dirichlet, alpha 0.3, 3 envoys), seed and budget: runs/compare-<id>/compare.json and .png.
compare: venv
	@$(RUN) compare $(MAKEOVERRIDES)

# The federation against its own compute, on synthetic data of MedMNIST's real split sizes.
# wan=20ms,50mbit,0.5% (each way) also runs it across hosts (network namespaces; root): docs/performance.md.
bench: venv
	@$(RUN) bench $(MAKEOVERRIDES)

# The network's two stems side by side on a task that only full resolution can see (localfed/stems.py): training
# images/s and test accuracy on one device. size 56, 112 or 224 (default 224); device, bf16 as for make bench.
stems: venv
	@$(RUN) stems $(MAKEOVERRIDES)

# A local CA and certificates, each with its role, in certs/: the director, envoy_1..envoy_<envoys>, and the
# researchers who may submit experiments (researchers="alice bob"; default one called researcher). More director
# names or addresses: make certs director_hosts="director.example.org 10.0.0.5"
director_hosts ?= $(or $(DIRECTOR_HOSTS),localhost 127.0.0.1)
researchers ?= $(or $(RESEARCHERS),researcher)
envoys ?= $(or $(ENVOYS),2)
certs: venv
	$(PY) -m security.certs make $(foreach h,$(director_hosts),--director-host $(h)) \
		$(foreach i,$(shell seq 1 $(envoys)),--envoy envoy_$(i)) $(foreach r,$(researchers),--researcher $(r))

# Every node's audit log checked (each line's hash chain; each envoy's payloads sent against the director's
# received), and what ran, who sent it, what left and the epsilon spent, per node. state=DIR: a node's state
# folder, or a folder of them (an envoy_state); default the latest run's. Exits 1 naming the node and the line.
state ?= runs/latest
audit: venv
	@$(PY) -m security.audit $(state)

# An envoy with approval: manual runs only code its operator approved. make review shows every code the nodes under
# envoy_state=DIR (or state=DIR) hold, by default make demo's envoys (runs/node-state): who sent it, its source,
# the plan, the diff against the nearest approved code; make approve code=CODE lets it run; make refuse code=CODE
# why="..." refuses it with that reason.
review_state = $(or $(envoy_state),$(if $(filter command line,$(origin state)),$(state)),runs/node-state)
code ?=
why ?=
review: venv
	@$(PY) -m security.review --state $(review_state) show
approve: venv
	@test -n "$(code)" || { echo "error: give the code: make approve code=CODE (make review shows it)" >&2; exit 2; }
	@$(PY) -m security.review --state $(review_state) approve $(code)
refuse: venv
	@test -n "$(code)" -a -n "$(why)" || { echo 'error: give the code and the reason the researcher reads: make refuse code=CODE why="..."' >&2; exit 2; }
	@$(PY) -m security.review --state $(review_state) refuse $(code) --why "$(why)"

# With CI=true (as CI sets it), also every other tested Python this machine has: make test-pythons.
test: venv
	$(VENV)/bin/ruff check .
ifeq ($(CI),true)
	@echo "== the other tested Pythons' environments: made in the background meanwhile (runs/test-pythons-prepare.log)"
	@mkdir -p runs; bash tools/test_pythons.sh prepare > runs/test-pythons-prepare.log 2>&1 & prepared=$$!; \
	$(PY) -m pytest; status=$$?; wait $$prepared; cat runs/test-pythons-prepare.log; \
	bash tools/test_pythons.sh $$status
else
	$(PY) -m pytest
endif

# The tests on each other tested Python found here (python3.X on PATH or in pyenv), in .venv-3.X; see the script.
test-pythons: venv
	bash tools/test_pythons.sh

# A federation of separate hosts on this machine, made of network namespaces: docs/across-hosts.md's path with
# a firewall, a wide-area link and a cable cut mid-round (tests/test_hosts.py; make test runs it in CI). Needs
# root and iproute2; installs nftables with apt-get if missing.
test-hosts: venv
	HOSTS_TEST=1 $(PY) -m pytest tests/test_hosts.py

lint: venv
	$(VENV)/bin/ruff check .

# On an Intel Gaudi host, inside the environment that holds Intel's PyTorch: install this project's
# other pins into it, keeping its torch, torchvision and Habana packages exactly as they are.
hpu-deps:
	python -m pip list --format=freeze | grep -iE '^(torch|torchvision|torchaudio|habana|lightning-habana)' > .hpu-keep.txt || true
	grep -vE '^(torch|torchvision|openfl)==' requirements.txt | python -m pip install -r /dev/stdin -c .hpu-keep.txt
	python -m pip install --no-deps --ignore-requires-python "$$(grep -E '^openfl==' requirements.txt)"
	rm -f .hpu-keep.txt

clean:
	rm -rf workspace/plan workspace/save workspace/logs workspace/*.pkl workspace/requirements.txt
