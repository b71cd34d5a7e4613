# The two commands a newcomer needs: `make demo` and `make test`.
# Each creates .venv from requirements.txt on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

# make demo / make baseline settings, e.g. make demo DATA=synthetic ENVOYS=3. Unset ones take their defaults
# from one place each: the notebook's (workspace/medfl/researcher/parameters.py) and the launcher's
# (localfed/__main__.py); the README's table lists them.
RUN_ARGS = --dataset "$(DATASET)" --size "$(SIZE)" --envoys "$(ENVOYS)" --rounds "$(ROUNDS)" \
	--epochs "$(EPOCHS)" --partition "$(PARTITION)" --alpha "$(ALPHA)" --seed "$(SEED)" \
	--data "$(DATA)" --data-dir "$(DATA_DIR)" --notebook "$(NOTEBOOK)" --device "$(DEVICE)" --tls "$(TLS)" \
	--min-envoys "$(MIN_ENVOYS)" --round-timeout "$(ROUND_TIMEOUT)" --bf16 "$(BF16)" --stem "$(STEM)" \
	--dp "$(DP)" --epsilon "$(EPSILON)"

.PHONY: venv demo baseline bench certs test test-hosts lint clean hpu-deps

$(VENV)/.installed: requirements.txt
	@$(PYTHON) -c 'import sys; v = sys.version_info[:2]; sys.exit(0 if (3, 8) <= v < (3, 12) else \
		"error: OpenFL 1.6 needs Python 3.8 to 3.11; run make PYTHON=python3.11 ...")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	@# The repository's own modules (openfl_adjustments, tlscerts, localfed) importable in this environment,
	@# the notebook's kernel included.
	$(PY) -c 'import pathlib, site; pathlib.Path(site.getsitepackages()[0], "medmnist-federated.pth").write_text("$(CURDIR)\n")'
	@touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m localfed demo $(RUN_ARGS)

baseline: venv
	$(PY) -m localfed baseline $(RUN_ARGS)

# The federation against its own compute, on synthetic data of MedMNIST's real split sizes.
# WAN=20ms,50mbit,0.5% (each way) also runs it across hosts (network namespaces; root): the README's round overheads.
bench: venv
	$(PY) -m localfed bench $(RUN_ARGS) --wan "$(WAN)"

# A local CA and certificates, each with its role, in certs/: the director, envoy_1..ENVOYS, and the researchers
# who may submit experiments (RESEARCHERS="alice bob"; default one called researcher). More director names or
# addresses: make certs DIRECTOR_HOSTS="director.example.org 10.0.0.5"
DIRECTOR_HOSTS ?= localhost 127.0.0.1
RESEARCHERS ?= researcher
certs: venv
	$(PY) tlscerts.py make $(foreach h,$(DIRECTOR_HOSTS),--director-host $(h)) \
		$(foreach i,$(shell seq 1 $(or $(ENVOYS),2)),--envoy envoy_$(i)) $(foreach r,$(RESEARCHERS),--researcher $(r))

test: venv
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

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
	grep -vE '^(torch|torchvision)==' requirements.txt | python -m pip install -r /dev/stdin -c .hpu-keep.txt
	rm -f .hpu-keep.txt

clean:
	rm -rf workspace/plan workspace/save workspace/logs workspace/*.pkl workspace/requirements.txt
