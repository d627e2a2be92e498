# dmengine — the three commands of the README.  Everything they need is installed here:
# a virtualenv in .venv, the package with its Cython extensions, and the Debian parts.
PY        ?= python3
VENV      := .venv
VPY       := $(VENV)/bin/python
STAMP     := $(VENV)/.installed
DEB_PARTS := libssl-dev libwbxml2-utils libwbxml2-dev kannel kannel-extras prometheus chromium wrk
PYTEST_ARGS ?=

.PHONY: run test bench bench-campaign fuzz deps venv build clean debug typecheck mutate

$(VPY):
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip setuptools wheel

$(STAMP): $(VPY) pyproject.toml setup.py
	$(VPY) -m pip install -q "cython>=3.0" setuptools wheel
	$(VPY) -m pip install -q -e '.[test]' --no-build-isolation
	touch $(STAMP)

venv: $(STAMP)

# Rebuild the extensions in place whenever a .pyx/.pxd changed (pip -e does not watch them).
build: $(STAMP)
	$(VPY) setup.py -q build_ext --inplace

debug: $(STAMP)
	DMENGINE_DEBUG=1 $(VPY) setup.py -q build_ext --inplace --force

deps:
	@bash tools/debian-parts.sh $(DEB_PARTS)

run: deps build
	$(VPY) -m dmengine serve --data ./var

test: deps build
	$(VPY) -m pytest -q $(PYTEST_ARGS)

bench: deps build
	$(VPY) -m bench

# The 1M-device FUMO campaign end to end (bench/bench_campaign.py): 10k, 100k and N devices.
N ?= 1000000
bench-campaign: deps build
	DMENGINE_CAMPAIGN_N=$(N) $(VPY) -m bench campaign

# Mutation testing of the service and API layers (tools/mutate.py: mutmut on a copy of the tree,
# one module at a time with its narrow tests; scores into tests/MUTATION.md).  Too slow for
# `make test`: run it before resolving an issue that changes those modules.
# MODULES="dmengine/auth.py dmengine/devices.py" runs some; `tools/mutate.py --list` names them.
MODULES ?=
mutate: build
	$(VPY) tools/mutate.py $(MODULES)

fuzz: deps build
	$(VPY) fuzz/run.py --runs 1000000

typecheck: build
	$(VPY) -m mypy dmengine/_wbxml.pyi dmengine/_message.pyi dmengine/_events.pyi dmengine/_account.pyi dmengine/events.py

clean:
	rm -rf build dmengine/*.so dmengine/*.c dmengine/*/*.so dmengine/*/*.c
