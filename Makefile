# Two commands for a fresh machine (see README):  make study   |   make test
# Each creates .venv/ (if missing) and installs the package with its pinned dependencies.

PYTHON ?= python3.11
VENV := .venv
SHARED := ../shared
# The main job uses the shared CIFAR-10 images and local SqueezeNet weights when they are beside the repo;
# otherwise torchvision's CIFAR-10 and ImageNet weights (downloaded when online).
DATA ?= $(if $(wildcard $(SHARED)/datasets/cifar10-train-jpeg),$(SHARED)/datasets/cifar10-train-jpeg,cifar10)
WEIGHTS ?= $(if $(wildcard $(SHARED)/weights/squeezenet1_1-imagenet-features.pth),$(SHARED)/weights/squeezenet1_1-imagenet-features.pth,imagenet)
SPEC ?= studies/quick.toml

.PHONY: study test install clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $@

install: $(VENV)/.installed

study: $(VENV)/.installed
	$(VENV)/bin/transferlab study run $(SPEC) --set data=$(DATA) --set weights=$(WEIGHTS)

test: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check --quiet src tests benchmarks
	$(VENV)/bin/pytest -q -ra

clean:
	rm -rf $(VENV) studies-out
