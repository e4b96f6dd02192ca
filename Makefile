# vnafs: build, test and demo entry points. Run as root on Debian 12.
#   make demo   create, mount and fill a demo filesystem under /var/tmp/vnafs-demo
#   make test   ruff + the whole pytest suite (what CI runs, see .ci/run)

PYTHON ?= python3
VENV   := .venv
PYTEST_ARGS ?=

# Debian packages needed to build pyfuse3 and to run the tests
# (gocryptfs only as a reference point for tools/bench; dcmtk, orthanc, curl and iproute2
# for the tests with real DICOM writers; nodejs for Azurite; samba and smbclient for the SMB
# re-export and Previous Versions tests; nfs-ganesha, its FSAL_VFS, the libnfs client commands
# and rpcbind for the NFS re-export tests, which run rpcbind themselves (NFSv3). nfs-common
# comes with nfs-ganesha anyway; it is listed so that the unit it enables is disabled below;
# systemd for systemd-analyze, which checks the installed units, also where systemd does not run).
SYSDEPS := fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv gocryptfs attr acl rsync \
           dcmtk orthanc curl iproute2 nodejs samba samba-vfs-modules smbclient \
           nfs-ganesha nfs-ganesha-vfs libnfs-utils rpcbind nfs-common systemd

# package:unit for the services that installing a package enables. `make sysdeps` disables (and,
# under a running systemd, stops) them right after installing that package: the tests start
# their own servers on free ports, and nothing should run at boot because `make test` ran once.
# Only packages installed in that run: an administrator's own services are never touched.
SERVICE_UNITS := samba:smbd.service samba:nmbd.service samba:samba-ad-dc.service \
                 orthanc:orthanc.service nfs-ganesha:nfs-ganesha.service \
                 nfs-ganesha:nfs-ganesha-lock.service rpcbind:rpcbind.service \
                 rpcbind:rpcbind.socket nfs-common:nfs-client.target

# Azurite (Azure Blob emulator) for the archive backend tests. 3.35.0 is the newest release that
# runs on node 20. Installed once into .cache/; the file target makes reruns silent. npm is not
# in SYSDEPS because NodeSource's nodejs package bundles npm and conflicts with Debian's npm
# package: it is installed only when no npm command exists (Debian's own nodejs).
AZURITE := .cache/azurite/node_modules/azurite/dist/src/blob/main.js

# The tests that need no root, no /dev/fuse and no mount: tests/unit/ (the file, engine and index
# code over a temporary hot store, see tests/unit/harness.py) and the other in-process tests.
# Of test_dicom_sniff.py and test_format1.py only the tests that mount nothing. `make test`
# runs all of them too.
UNIT_TESTS := tests/unit tests/test_meta.py tests/test_keys_seal.py tests/test_dicom_header.py \
              tests/test_dicom_names.py tests/test_heap.py tests/test_layers.py \
              tests/test_mountinfo.py tests/test_requires.py tests/test_gen_studies.py \
              tests/test_dicom_sniff.py::test_transfer_syntax_matches_pydicom_on_the_corpus \
              tests/test_dicom_sniff.py::test_bad_heads_give_none \
              tests/test_format1.py::test_vectors_in_format_md_match_an_independent_implementation \
              tests/test_format1.py::test_vnafs_opens_the_vectors \
              tests/test_format1.py::test_vnafs_records_and_log_part_agree_with_the_vectors \
              tests/test_format1.py::test_vnafs_seals_the_raw_block_as_the_vector_says \
              tests/test_format1.py::test_frozen_manifest_is_what_the_tests_expect

# `make install`: vnafs in its own venv under PREFIX (never pip into the system Python), the
# command on the system path, the mount helpers mount(8) looks for (for fstab entries of type
# fuse.vnafs; /sbin is on its fixed search path) and the systemd units. `make uninstall` removes
# exactly these. All four can be moved, e.g. for a test: make install PREFIX=/tmp/x/opt ...
PREFIX  ?= /opt/vnafs
BINDIR  ?= /usr/local/bin
SBINDIR ?= /sbin
UNITDIR ?= /etc/systemd/system
UNITS   := $(wildcard systemd/*.service systemd/*.timer)

.DEFAULT_GOAL := help
.PHONY: help sysdeps venv test unit lint demo bench clean install uninstall

help:
	@echo "make demo    install everything, create and mount a demo filesystem with sample DICOM"
	@echo "make test    install everything, run ruff and the whole test suite"
	@echo "make unit    the in-process tests only (no root, no mount; under a minute)"
	@echo "make lint    ruff check and mypy"
	@echo "make bench   run tools/bench"
	@echo "make venv    Debian packages + $(VENV) with vnafs installed editable"
	@echo "make install vnafs under $(PREFIX), the command, mount helpers and systemd units (root)"
	@echo "make clean   remove $(VENV) and build artifacts"

# Installs only when a package is missing, so reruns are silent and need no network.
sysdeps:
	@missing=""; \
	for p in $(SYSDEPS); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' \
			|| missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" -ne 0 ]; then \
			echo "make sysdeps: missing Debian packages:$$missing; run make as root to install them" >&2; \
			exit 1; \
		fi; \
		echo "make sysdeps: installing$$missing"; \
		apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(SYSDEPS) \
			|| exit 1; \
		if [ -d /run/systemd/system ]; then now=--now; else now=; fi; \
		for pu in $(SERVICE_UNITS); do \
			case " $$missing " in *" $${pu%%:*} "*) ;; *) continue ;; esac; \
			unit=$${pu#*:}; \
			systemctl list-unit-files --no-legend "$$unit" >/dev/null 2>&1 || continue; \
			echo "make sysdeps: systemctl disable $${now:+$$now }$$unit"; \
			systemctl disable $$now "$$unit" || exit 1; \
		done; \
	fi

# sysdeps is order-only: it always runs its (cheap) check, but never forces a venv rebuild.
$(VENV)/.stamp: pyproject.toml | sysdeps
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check --upgrade pip
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

venv: $(VENV)/.stamp

$(AZURITE): | sysdeps
	@command -v npm >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
		--no-install-recommends npm
	npm install --no-audit --no-fund --silent --prefix .cache/azurite azurite@3.35.0

test: venv $(AZURITE)
	$(VENV)/bin/ruff check vnafs tools tests
	$(VENV)/bin/mypy vnafs
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS) tests

unit: venv
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS) $(UNIT_TESTS)

lint: venv
	$(VENV)/bin/ruff check vnafs tools tests
	$(VENV)/bin/mypy vnafs

demo: venv
	$(VENV)/bin/vnafs demo

bench: venv
	$(VENV)/bin/python -m tools.bench

install: | sysdeps
	@[ "$$(id -u)" -eq 0 ] || { echo "make install: run as root" >&2; exit 1; }
	$(PYTHON) -m venv $(PREFIX)
	$(PREFIX)/bin/pip install -q --disable-pip-version-check --upgrade pip
	$(PREFIX)/bin/pip install -q --disable-pip-version-check .
	install -d $(BINDIR) $(SBINDIR) $(UNITDIR)
	ln -sfn $(PREFIX)/bin/vnafs $(BINDIR)/vnafs
	ln -sfn $(PREFIX)/bin/vnafs $(SBINDIR)/mount.fuse.vnafs
	ln -sfn $(PREFIX)/bin/vnafs $(SBINDIR)/umount.fuse.vnafs
	for u in $(UNITS); do \
		sed 's|@BINDIR@|$(BINDIR)|g' $$u > $(UNITDIR)/$${u##*/} && chmod 644 $(UNITDIR)/$${u##*/} || exit 1; \
	done
	@if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	@echo "installed vnafs in $(PREFIX), $(BINDIR)/vnafs, $(SBINDIR)/mount.fuse.vnafs and the units in $(UNITDIR)"

uninstall:
	@[ "$$(id -u)" -eq 0 ] || { echo "make uninstall: run as root" >&2; exit 1; }
	rm -f $(BINDIR)/vnafs $(SBINDIR)/mount.fuse.vnafs $(SBINDIR)/umount.fuse.vnafs
	for u in $(UNITS); do rm -f $(UNITDIR)/$${u##*/}; done
	@# Only a directory holding our venv is removed: PREFIX=/usr by mistake stays.
	if [ -x $(PREFIX)/bin/vnafs ] && [ -f $(PREFIX)/pyvenv.cfg ]; then rm -rf $(PREFIX); fi
	@if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache .mypy_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
