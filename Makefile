# `make run` brings the whole system up; `make test` proves it. Both start from
# a fresh Debian machine: they install what they need, every time, idempotently.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# What the engine runs on every host (the Docker image installs only these):
# util-linux/fdisk: sfdisk, lsblk, losetup, mount; e2fsprogs and partclone: used
# mode's block maps; zstd: RESTORE.txt; gzip, xz, 7-Zip: importing classic backups;
# fuse3: mount; e2fsprogs, mtools, dosfstools, ntfs-3g, xfsprogs, btrfs-progs: files,
# extract and verify --fsck;
# openssl: deriving a key's subkeys in a shell, as an encrypted image's RESTORE.txt does;
# rclone: sync to remote datastores; qemu-system-x86, qemu-utils, ovmf: boot tests.
RUNTIME_PACKAGES := python3-venv fdisk util-linux e2fsprogs partclone zstd gzip xz-utils p7zip-full \
	fuse3 mtools dosfstools ntfs-3g openssl rclone xfsprogs btrfs-progs qemu-system-x86 \
	qemu-utils ovmf
# The rest: Redis and PostgreSQL on loopback; libfuse3-dev + gcc: the faulty
# test disk; gddrescue: the reference for read-error maps; chromium: the page
# tests; docker-compose: checking docker-compose.yml; zbar-tools: reading a paper key's QR
# code back; openssh-server: an SFTP server on loopback for the remote datastore tests; borg,
# restic, time: the benchmark's peers; lvm2, cryptsetup-bin: LVM and LUKS test disks made
# by their own tools; extlinux, syslinux-common, systemd-boot-efi, busybox-static, cpio: the
# bootable demo and test disks (bench/bootable.py), binutils: the boot probe's assembly.
APT_PACKAGES := $(RUNTIME_PACKAGES) redis-server redis-tools postgresql chromium chromium-driver \
	docker-compose curl libfuse3-dev pkg-config gcc gddrescue zbar-tools openssh-server borgbackup \
	restic time lvm2 cryptsetup-bin extlinux syslinux-common systemd-boot-efi busybox-static cpio \
	binutils

# What the virtualenv gets: everything for a developer; the Docker image takes requirements.txt.
REQUIREMENTS ?= requirements-test.txt

.PHONY: install system-packages services run test bench install-services clean

# The bootable disks' tiny Linux: a kernel from Debian's linux-image package, busybox.
BOOT_PAYLOAD := build/boot/initrd.img

install: system-packages $(VENV)/.installed $(VENV)/wheels/.built $(BOOT_PAYLOAD)

system-packages:
	@missing=$$(for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; \
	done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

$(VENV)/.installed: requirements.txt requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r $(REQUIREMENTS)
	touch $@

# Wheels of what every host runs: a host joining this one installs its worker from them,
# served with the join command (webui/services/hosts.py), needing no internet.
$(VENV)/wheels/.built: requirements.txt | $(VENV)/.installed
	rm -rf $(VENV)/wheels
	$(PY) -m pip wheel -q --disable-pip-version-check -r requirements.txt -w $(VENV)/wheels
	touch $@

$(BOOT_PAYLOAD): bench/bootable.py bench/boot-init.sh | $(VENV)/.installed
	$(PY) -m bench.bootable build/boot

# PostgreSQL for the tests, on loopback when none answers (each test run starts its own Redis).
services: install
	@ops/services.sh

# Web server, worker for this host, beat (and Redis if none answers) until Ctrl-C.
run: install
	@ops/run.sh

test: install
	@ops/test.sh

bench: install
	$(PY) -m bench

# The services as systemd units (restarted on failure, started at boot), instead of make run.
install-services: install
	$(PY) manage.py install_units redis web worker beat

clean:
	rm -rf $(VENV) data build tests/.build
