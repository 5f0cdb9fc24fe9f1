# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean corpus data

$(STAMP): pyproject.toml Makefile
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# torch from pip's index (the CPU build where the index serves it; a venv that has torch keeps it)
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q torch==2.13.0
	# Triton runs its kernels in the interpreter on CPU for the tests (TRITON_INTERPRET=1)
	$(VPY) -c "import triton" 2>/dev/null || $(VPY) -m pip install -q "triton==3.6.0" || echo "triton not installed: kernel tests will be skipped"
	$(VPY) -m pip install -q -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(VPY) -m pytest -q -x tests

demo: $(STAMP)
	$(VPY) -m gca.cli demo

# the offline English corpus (Debian's documentation packages; needs root and apt)
corpus:
	apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
		linux-doc python3-doc perl-doc python-django-doc postgresql-doc git-doc apache2-doc debian-reference-en

data: $(STAMP)
	$(VPY) -m gca.cli prepare debian-docs --out data/debian-docs --val-fraction 0.1

clean:
	rm -rf $(VENV) build *.egg-info
