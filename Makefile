# The two commands of the README: `make study` (set up, run a real study) and `make test`.
.PHONY: setup study test test-e2e bench-quick

setup:
	@scripts/setup.sh

study: setup
	.venv/bin/strata run examples/fashion-quick.yaml --report examples/fashion-quick.report.json

test: setup
	.venv/bin/python -m pytest -q -p no:cacheprovider --durations=15

test-e2e: setup
	.venv/bin/python -m pytest -q -m e2e

bench-quick: setup
	.venv/bin/python bench/reuse_benchmark.py --quick
