# `make run` shows the product working; `make test` proves it. Both start from
# a fresh Debian machine: they install what they need, every time, idempotently.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# util-linux/fdisk: sfdisk, lsblk, losetup; fuse3 + libfuse3-dev + gcc: the faulty
# test disk; gddrescue: the reference for read-error maps; the rest are the peers
# the benchmark compares with and the filesystems the tests build.
APT_PACKAGES := python3-venv fdisk util-linux e2fsprogs dosfstools mtools fuse3 libfuse3-dev pkg-config \
	gcc zstd gddrescue partclone borgbackup p7zip-full gzip xz-utils time

.PHONY: install system-packages run test bench clean

install: system-packages $(VENV)/.installed

system-packages:
	@missing=$$(for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; \
	done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

run: install
	$(PY) -m demo

test: install
	@$(PY) -m pytest tests; status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; \
	exit $$status

bench: install
	$(PY) -m bench

clean:
	rm -rf $(VENV) data tests/.build
