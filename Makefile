# clinicsync: every set-up step lives here, so a fresh machine needs only `make demo` / `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# Lambda runs python3.13; find a real 3.13 interpreter (PATH first, then pyenv's install dir) without help.
PYENV_DIR ?= $(or $(PYENV_ROOT),$(HOME)/.pyenv)
PY313 := $(shell for p in $$(command -v python3.13 2>/dev/null) $$(ls -d $(PYENV_DIR)/versions/3.13*/bin/python3.13 2>/dev/null); do \
	"$$p" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 13))' >/dev/null 2>&1 && echo "$$p" && break; done)
PY313_BIN := $(dir $(PY313))

VENV := .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
SAM_VENV := .venv-sam
LAYER_VENV := .venv-layer
SAM := $(SAM_VENV)/bin/sam
MIS ?= medods
CRM ?= bitrix24

.PHONY: help venv sam-venv layer-venv lock exports package-check lint typecheck pytest test-unit validate build test demo schema docs clean check-python connector chaos browser bench bench-readme bench-scale bench-scale-50k test-pinned model-large fleet-50

help:
	@echo "make demo   - local runtime against the emulators (MIS=$(MIS) CRM=$(CRM))"
	@echo "make test   - ruff, mypy --strict, pytest, sam validate --lint, sam build"
	@echo "make test-unit - the unit tier only (tests/unit: rules and pure code, under 30 s)"
	@echo "make test-pinned - the end-to-end suites again at pinned clock times (PINNED_TIMES=...)"
	@echo "make chaos  - the full chaos-convergence run (800 patients, 2,000 MIS events, both CRMs); figures in chaos-report.json"
	@echo "make docs   - regenerate docs/clinic-config.schema.json and docs/config-reference.md"
	@echo "make bench  - clinicsync vs fast_bitrix24, the per-record loop and amocrm-api at the CRMs' rate limits; bench/report.json"
	@echo "make bench-readme - README.md's Performance tables from bench/report.json (recorded in docs/bench/)"
	@echo "make bench-scale - clinicsync's backfill at 1k and 5k appointments, both CRMs, linearity check; bench/scale.json"
	@echo "make bench-scale-50k - the same at 1k and 50k appointments (long); bench/scale-50k.json"
	@echo "make model-large - the model-based test of the whole system for MODEL_MINUTES (default 20) per CRM/MIS pair"
	@echo "make connector - build the IDENT connector wheel and the core wheel it needs (dist/connector/) and smoke-test them"
	@echo "make lock   - re-resolve uv.lock (after editing pyproject.toml's dependencies) and export the pinned requirements files"
	@echo "make package-check - build the wheel, install it into a throwaway venv, run clinicsync --help"
	@echo "make fleet-50 - roll two releases out to 50 clinics' stacks (moto CloudFormation); figures in fleet-report.json"

check-python:
	@test -n "$(PY313)" || { echo "python3.13 not found on PATH or under $(PYENV_DIR)/versions" >&2; exit 1; }

# The locked dev requirements, then the project itself in editable mode (the `clinicsync` command), built
# with the locked hatchling already installed, so no build step reaches an index.
$(VENV)/.installed: requirements-dev.txt pyproject.toml | check-python
	test -x $(PY) || $(PY313) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

$(SAM_VENV)/.installed: | check-python
	test -x $(SAM_VENV)/bin/python || $(PY313) -m venv $(SAM_VENV)
	$(SAM_VENV)/bin/pip install -q --upgrade pip
	$(SAM_VENV)/bin/pip install -q aws-sam-cli==1.170.0
	touch $@

# Only the layer's requirements, as deployed: the bench measures the handlers' import time with it.
$(LAYER_VENV)/.installed: layers/shared/requirements.txt | check-python
	test -x $(LAYER_VENV)/bin/python || $(PY313) -m venv $(LAYER_VENV)
	$(LAYER_VENV)/bin/pip install -q -r layers/shared/requirements.txt
	touch $@

venv: $(VENV)/.installed
sam-venv: $(SAM_VENV)/.installed
layer-venv: $(LAYER_VENV)/.installed

# uv.lock is the one record of every version; both requirements files are exported from it, pinned (pip
# installs them: `sam build` the layer's, `make venv` the dev one). The layer gets the runtime dependencies
# without the CLI-only ones. tests/infra/test_packaging.py fails when an export drifts from the lock.
LAYER_REQUIREMENTS ?= layers/shared/requirements.txt
DEV_REQUIREMENTS ?= requirements-dev.txt
LAYER_PRUNE := typer rich
EXPORT := $(UV) export --frozen --no-emit-workspace --no-hashes --no-header
EXPORT_NOTE := \# Generated from uv.lock by make lock: edit pyproject.toml, never this file.

lock: venv
	$(UV) lock
	$(MAKE) --no-print-directory exports

exports:
	{ echo '$(EXPORT_NOTE)'; $(EXPORT) $(addprefix --prune ,$(LAYER_PRUNE)); } > $(LAYER_REQUIREMENTS)
	{ echo '$(EXPORT_NOTE)'; $(EXPORT) --extra dev; } > $(DEV_REQUIREMENTS)

# What a user gets from `pip install .`: the wheel builds, installs (at the locked versions) into a throwaway
# venv and its `clinicsync` command starts. About 30 s with a warm pip cache.
PACKAGE_SMOKE := .package-smoke
package-check: venv
	rm -rf dist/package $(PACKAGE_SMOKE)
	$(PY) -m pip wheel -q --no-deps -w dist/package .
	$(PY313) -m venv $(PACKAGE_SMOKE)
	$(PACKAGE_SMOKE)/bin/pip install -q -c $(DEV_REQUIREMENTS) dist/package/clinicsync-*.whl
	$(PACKAGE_SMOKE)/bin/clinicsync --help >/dev/null
	rm -rf $(PACKAGE_SMOKE)
	@echo "built $$(ls dist/package/*.whl)"

lint: venv
	$(VENV)/bin/ruff check layers functions sandbox tests connector cli
	$(VENV)/bin/ruff format --check layers functions sandbox tests connector cli
	PYTHONPATH=layers/shared:cli:connector:. $(VENV)/bin/lint-imports

typecheck: venv
	$(VENV)/bin/mypy --strict

# Headless Chromium for the report's screenshot test: the system's, or Debian's debs from the apt cache
# unpacked into .chromium/ (no root, no network); fails loudly if its libraries do not resolve.
browser:
	@sandbox/browser.sh >/dev/null

pytest: venv sam-venv browser
	$(PY) -m pytest -q -n 3  # on two cores: the suites wait on loopback I/O more than they compute (7.6 -> 5.9 min)

# Tests in tiers: unit (rules and pure code, no AWS, no emulator), adapters (one adapter against its emulator
# or moto), emulators, e2e (the local stack: handlers, moto, emulators), infra (template, packaging, docs).
test-unit: venv
	$(PY) -m pytest -q tests/unit

# sam validate --lint needs a region; nothing here talks to AWS.
validate: sam-venv
	AWS_DEFAULT_REGION=eu-central-1 $(SAM) validate --lint --template template.yaml

# sam build resolves the python3.13 workflow from PATH, so put our interpreter first. --cached: the
# deploy test's own real `sam build` reuses .aws-sam/cache instead of building everything again.
build: sam-venv
	PATH="$(PY313_BIN):$$PATH" AWS_DEFAULT_REGION=eu-central-1 $(SAM) build --template template.yaml --cached

test: lint typecheck validate build package-check pytest

# The suites whose data moves with the calendar (the sample clinic, MIS feeds, TLS) again at pinned
# wall-clock times (time-machine; tests/plugins/pinned_clock.py), in the clinic's zone: around midnight,
# early morning, opening time, Sundays and month ends, including a leap day. No test may depend on them.
PINNED_TIMES ?= 2026-12-06T05:20+03:00 2027-01-31T23:30+03:00 2027-03-01T00:05+03:00 2027-04-30T09:00+03:00 \
	2028-02-29T23:55+03:00
PINNED_SUITES ?= $(wildcard tests/e2e/test_e2e_*.py tests/e2e/test_model_*.py) tests/adapters/test_ident_connector.py \
	tests/adapters/test_infoclinica.py tests/adapters/test_renovatio.py tests/e2e/test_poller_guarantees.py tests/e2e/test_concurrency.py \
	tests/e2e/test_chaos_regressions.py tests/e2e/test_hostile_routes.py tests/e2e/test_time_independence.py
PINNED_WORKERS ?= 3

test-pinned: venv
	@summary=(); failed=0; \
	for at in $(PINNED_TIMES); do \
		start=$$(date +%s); \
		if CLINICSYNC_PINNED_TIME=$$at $(PY) -m pytest -q -n $(PINNED_WORKERS) $(PINNED_SUITES); then verdict=green; \
		else verdict=RED; failed=1; fi; \
		summary+=("pinned $$at: $$verdict in $$(( $$(date +%s) - start )) s"); \
	done; \
	printf '%s\n' "--- pinned clock runs ---" "$${summary[@]}"; exit $$failed

demo: venv
	$(PY) -m sandbox.demo --mis $(MIS) --crm $(CRM)

# The clinic config's JSON Schema, for editors and the docs (a test keeps the committed copy current).
schema: venv
	$(PY) -c 'import json, sandbox; from clinicsync.domain.config import clinic_config_json_schema as s; \
		print(json.dumps(s(), indent=2, ensure_ascii=False))' > docs/clinic-config.schema.json
	$(PY) -c 'import json, sandbox; from clinicsync_cli.fleet.registry import fleet_json_schema as s; \
		print(json.dumps(s(), indent=2, ensure_ascii=False))' > docs/fleet.schema.json

# The config reference, generated from the JSON Schema (a test keeps the committed copy current).
docs: schema
	$(PY) -c 'import sandbox; from clinicsync_cli.docs import main; main(["docs/clinic-config.schema.json"])' \
		> docs/config-reference.md

# Faults at random (20 % of CRM calls, 10 % crashed syncer invocations, redelivered messages), then the
# check that the CRM equals the MIS: no duplicate, no lost update, no PII anywhere. The reduced run is in
# make test (tests/e2e/test_chaos.py).
chaos: venv
	$(PY) -m sandbox.chaos --report chaos-report.json

# Requests, time at the rate limit (one simulated clock for every contestant), CPU, imports, latency and
# AWS cost, side by side in one run for both CRMs; the reduced run is in make test (tests/infra/test_bench_smoke.py).
# BENCH_ARGS=--twice runs it all again and fails unless the simulated figures are identical.
bench: venv layer-venv
	$(PY) -m sandbox.bench --report bench/report.json $(BENCH_ARGS)

# The backfill's scale curve (README Performance, "Scale curve"): clinicsync alone, a fresh process per
# size and CRM; every deal checked in the CRM. BENCH_ARGS=--twice fails unless the simulated figures repeat.
# README.md's Performance tables from the last `make bench` (and, with SCALE=bench/scale.json, a scale run):
# the run is recorded in docs/bench/, and make test fails if the README's tables differ from that record.
bench-readme: venv
	$(PY) -m sandbox.bench.readme --from-report bench/report.json $(if $(SCALE),--from-scale $(SCALE))

bench-scale: venv
	$(PY) -m sandbox.bench --scale 1000,5000 --report bench/scale.json $(BENCH_ARGS)

bench-scale-50k: venv
	$(PY) -m sandbox.bench --scale 1000,50000 --report bench/scale-50k.json $(BENCH_ARGS)

# The model-based test (tests/e2e/test_model_sync.py) with long examples, round after round, for MODEL_MINUTES per
# CRM/MIS pair; its small profile is in make test. model-report.jsonl: the examples and steps each pair ran.
MODEL_MINUTES ?= 20
model-large: venv
	rm -f model-report.jsonl
	CLINICSYNC_HYPOTHESIS=large CLINICSYNC_MODEL_MINUTES=$(MODEL_MINUTES) CLINICSYNC_MODEL_REPORT=model-report.jsonl \
		$(PY) -m pytest -q -p no:logging -n 4 tests/e2e/test_model_sync.py
	cat model-report.jsonl

# The IDENT connector wheel and the core wheel it depends on, both for clinics: installed (the core by its
# path, never from an index) into a throwaway venv with only their declared dependencies and started once,
# so a missing dependency shows up here, not at a clinic.
connector: venv
	rm -rf dist/connector .connector-smoke
	$(PY) -m pip wheel -q --no-deps -w dist/connector . ./connector
	$(PY313) -m venv .connector-smoke
	.connector-smoke/bin/pip install -q -c $(DEV_REQUIREMENTS) dist/connector/*.whl
	.connector-smoke/bin/clinicsync-ident --help >/dev/null
	rm -rf .connector-smoke
	@echo "built $$(ls dist/connector/*.whl)"

# 50 clinics' stacks from the real template (SAM transform, moto's CloudFormation, change sets): a create
# rollout, an update rollout, then `fleet status`; wall time, change sets and concurrency in fleet-report.json.
# The scaled-down scenarios (canary breach and rollback, resume) are in make test (tests/infra/test_fleet.py).
fleet-50: venv sam-venv
	$(PY) -m sandbox.fleet --clinics 50 --concurrency 8 --report fleet-report.json

clean:
	rm -rf .aws-sam .demo dist .connector-smoke .package-smoke .chromium
