# mlpipe developer commands. `make help` lists them.
SHELL := /bin/bash
UV ?= uv
# scripts/bootstrap may install uv with `pip --user`.
export PATH := $(HOME)/.local/bin:$(PATH)
PROTO_OUT := libs/mlpipe/src

.PHONY: help bootstrap demo up up-containers down test test-faults test-recovery test-faults-scale test-browser test-containers test-containers-scale lint typecheck protos check-protos

help:
	@grep -E '^[a-z-]+:.*## ' Makefile | sed -E 's/:.*## /\t/'

bootstrap: ## install uv (if missing) and the locked environment
	@./scripts/bootstrap

demo: bootstrap ## run the iris example end to end on the local emulators, then stop them
	@$(UV) run --frozen mlpipe demo --example iris

up: bootstrap ## start the local stack (emulators, topology, services)
	@$(UV) run --frozen mlpipe up

up-containers: bootstrap ## the same, each service as its image under Cloud Run's contract (needs dockerd)
	@$(UV) run --frozen mlpipe up --containers

down: ## stop everything `make up` started
	@$(UV) run --frozen mlpipe down

test: bootstrap ## lint, import contracts, type-check, unit, integration and e2e tests
	@$(UV) run --frozen ruff check .
	@$(UV) run --frozen lint-imports
	@$(UV) run --frozen ruff format --check .
	@$(UV) run --frozen mypy libs services jobs
	@# Two workers, each with its own emulators; a file's tests stay on one worker (they
	@# share its module fixtures). Most of the time is spent waiting on stacks and emulators.
	@# The tests of whole local stacks (several instances, restarts, start-up) then run alone:
	@# their timing bounds are for a stack that has the machine to itself.
	@$(UV) run --frozen pytest -m "not faults and not containers and not cloud" \
		-n 2 --dist loadfile --durations=20 --ignore-glob="tests/integration/test_localstack_*"
	@$(UV) run --frozen pytest -m "not faults and not containers and not cloud" \
		--durations=10 tests/integration/test_localstack_*.py

test-faults: bootstrap ## fault suite: duplicate storm, bad-input catalogue, 1000-request burst (~2 min)
	@$(UV) run --frozen pytest -m faults tests/faults/test_faults.py

test-recovery: bootstrap ## crash points, emulator restarts, SIGTERM, failures replay (~4 min)
	@$(UV) run --frozen pytest -m faults tests/faults/test_recovery.py

test-faults-scale: bootstrap ## the fault suites at three instances per service behind haproxy (~5 min)
	@$(UV) run --frozen pytest -m faults tests/faults/test_instances.py

test-browser: bootstrap ## the console's pages in Debian's chromium (also part of `make test`; ~80 s)
	@$(UV) run --frozen pytest -m browser tests/browser

test-containers: bootstrap ## the chain through the service images on a Docker engine (builds them; needs dockerd)
	@$(UV) run --frozen pytest -m containers tests/containers/test_stack_in_containers.py

test-containers-scale: bootstrap ## two containers of each image behind haproxy, the chain through them (~4 min)
	@$(UV) run --frozen pytest -m containers tests/containers/test_instances_in_containers.py

.PHONY: test-cloud
test-cloud: bootstrap ## Vertex AI's real clients against the local Vertex AI stand-in (needs dockerd)
	@$(UV) run --frozen pytest -m cloud

protos: ## regenerate the Python event code from protos/
	$(UV) run --frozen python -m grpc_tools.protoc -I protos \
		--python_out=$(PROTO_OUT) --mypy_out=$(PROTO_OUT) \
		protos/mlpipe/v1/*.proto
