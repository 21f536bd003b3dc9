# One obvious way to run things. Every target sets itself up first (idempotent).
.PHONY: setup demo test check bench bench-smoke

setup:          ## install Python deps, build llama-server, make the tiny model
	scripts/setup.sh

demo:           ## a demo fleet: balancer, two agents, two rower sim servers (REAL=1: llama-servers)
	scripts/demo.sh $(if $(REAL),--real,)

test:           ## everything CI runs: lint, types, unit, integration, end-to-end
	scripts/test.sh

check:          ## lint and types only
	.venv/bin/ruff check src tests bench scripts
	.venv/bin/ruff format --check src tests bench scripts
	.venv/bin/mypy

bench:          ## the benchmark suite (~20 min): report and plots in bench/results/ (QUICK=1: minutes)
	bench/setup.sh
	.venv/bin/python -m bench.run $(if $(QUICK),--quick,)

bench-smoke:    ## a smoke run of every benchmark scenario (seconds each)
	.venv/bin/pytest -q tests/bench
