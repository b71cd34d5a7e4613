# The two commands a newcomer needs: `make demo` and `make test`.
# Each creates .venv from requirements.txt on first use, with the first tested Python it finds (the range is
# requires-python in pyproject.toml), or the one PYTHON names: make PYTHON=python3.12 demo
PYTHON ?=
VENV := .venv
PY := $(VENV)/bin/python

# make demo / make baseline / make compare settings, e.g. make demo DATA=synthetic ENVOYS=3 ALGO=fedprox. Unset
# ones take their defaults from one place each: the notebook's (workspace/medfl/researcher/parameters.py) and the
# launcher's (localfed/__main__.py); the README's table lists them.
RUN_ARGS = --dataset "$(DATASET)" --size "$(SIZE)" --envoys "$(ENVOYS)" --rounds "$(ROUNDS)" \
	--epochs "$(EPOCHS)" --partition "$(PARTITION)" --alpha "$(ALPHA)" --seed "$(SEED)" \
	--data "$(DATA)" --data-dir "$(DATA_DIR)" --notebook "$(NOTEBOOK)" --device "$(DEVICE)" --tls "$(TLS)" \
	--min-envoys "$(MIN_ENVOYS)" --round-timeout "$(ROUND_TIMEOUT)" --bf16 "$(BF16)" --stem "$(STEM)" \
	--dp "$(DP)" --epsilon "$(EPSILON)" --algo "$(ALGO)" --mu "$(MU)" --server-lr "$(SERVER_LR)" \
	--ntd-beta "$(NTD_BETA)" --wire-dtype "$(WIRE_DTYPE)"

.PHONY: venv demo baseline bench stems compare certs test test-pythons test-hosts lint clean hpu-deps

# Reinstalls when requirements.txt is newer than $(VENV)/.installed; recreates for another PYTHON.
venv:
	@PYTHON="$(PYTHON)" bash tools/venv.sh make $(VENV)

demo: venv
	$(PY) -m localfed demo $(RUN_ARGS)

baseline: venv
	$(PY) -m localfed baseline $(RUN_ARGS)

# Every algorithm of ALGOS (default "fedavg fedprox fedadam median") and the centralized baseline on the same data,
# partition (default dirichlet, ALPHA 0.3, 3 envoys), seed and budget: runs/compare-<id>/compare.json and compare.png.
compare: venv
	$(PY) -m localfed compare $(RUN_ARGS) --algorithms "$(ALGOS)"

# The federation against its own compute, on synthetic data of MedMNIST's real split sizes.
# WAN=20ms,50mbit,0.5% (each way) also runs it across hosts (network namespaces; root): the README's round overheads.
bench: venv
	$(PY) -m localfed bench $(RUN_ARGS) --wan "$(WAN)"

# The network's two stems side by side on a task that only full resolution can see (localfed/stems.py): training
# images/s and test accuracy on one device. SIZE 56, 112 or 224 (default 224); DEVICE, BF16 as for make bench.
stems: venv
	$(PY) -m localfed.stems --size "$(or $(SIZE),224)" --device "$(or $(DEVICE),auto)" --bf16 "$(or $(BF16),0)"

# A local CA and certificates, each with its role, in certs/: the director, envoy_1..ENVOYS, and the researchers
# who may submit experiments (RESEARCHERS="alice bob"; default one called researcher). More director names or
# addresses: make certs DIRECTOR_HOSTS="director.example.org 10.0.0.5"
DIRECTOR_HOSTS ?= localhost 127.0.0.1
RESEARCHERS ?= researcher
certs: venv
	$(PY) -m security.certs make $(foreach h,$(DIRECTOR_HOSTS),--director-host $(h)) \
		$(foreach i,$(shell seq 1 $(or $(ENVOYS),2)),--envoy envoy_$(i)) $(foreach r,$(RESEARCHERS),--researcher $(r))

# With CI=true (as CI sets it), also every other tested Python this machine has: make test-pythons.
test: venv
	$(VENV)/bin/ruff check .
ifeq ($(CI),true)
	$(PY) -m pytest; bash tools/test_pythons.sh $$?
else
	$(PY) -m pytest
endif

# The tests on each other tested Python found here (python3.X on PATH or in pyenv), in .venv-3.X; see the script.
test-pythons: venv
	bash tools/test_pythons.sh

# A federation of separate hosts on this machine, made of network namespaces: the README's across-hosts path with
# a firewall, a wide-area link and a cable cut mid-round (tests/test_hosts.py, about 3 minutes; make test runs it
# in CI). Needs root and iproute2; installs nftables with apt-get if missing.
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
