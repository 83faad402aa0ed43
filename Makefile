# depdrill: `make demo` (install, build the lab, audit it, print the report path) and `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
# The repository root holds a folder named `depdrill` (the core) while the stages live in
# sibling folders mapped into the installed package; never let the working directory
# shadow the installed package.
export PYTHONSAFEPATH := 1

APT_PACKAGES := dnsmasq-base redis-server nftables iptables iproute2 tcpdump libpcap0.8 \
	libnetfilter-queue-dev dnsutils iputils-ping procps util-linux openssl gcc python3-dev \
	chromium tshark dnsperf
STAMPS := .stamps

.PHONY: demo test lint fmt bench install system clean

$(STAMPS)/system:
	@mkdir -p $(STAMPS)
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	@touch $@

$(STAMPS)/venv: pyproject.toml $(STAMPS)/system
	@test -x $(PY) || python3 -m venv $(VENV)
	@echo "installing Python packages into $(VENV)"
	@$(PY) -m pip install -q --disable-pip-version-check --upgrade pip setuptools wheel >$(STAMPS)/pip.log 2>&1 || { cat $(STAMPS)/pip.log; exit 1; }
	@$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]' --config-settings editable_mode=strict >$(STAMPS)/pip.log 2>&1 || { cat $(STAMPS)/pip.log; exit 1; }
	@$(PY) -c 'import depdrill, scapy, pyroute2, netfilterqueue, OpenSSL' 
	@touch $@

system: $(STAMPS)/system

# Strict editable installs serve new files only after a re-install: do it every time (~2 s).
install: $(STAMPS)/venv
	@$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . --config-settings editable_mode=strict >$(STAMPS)/install.log 2>&1 || { cat $(STAMPS)/install.log; exit 1; }

test: install
	$(PY) -m pytest -q -p no:cacheprovider

lint: install
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	cd build && ../$(VENV)/bin/mypy --config-file ../pyproject.toml --cache-dir ../.mypy_cache -p depdrill

fmt: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The lab fails some tests on purpose (that is what the report shows): exit 1 is a result.
demo: install
	@$(VENV)/bin/depdrill audit -o demo-report; rc=$$?; [ $$rc -le 1 ] || exit $$rc

bench: install
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf build $(STAMPS) .mypy_cache .ruff_cache demo-report
