# The two quickstart commands: `make demo` and `make test`. Both create .venv with Python 3.11 and install into it.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo serve test test-fast install install-test install-bench protos bench-kernels bench-predict clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install --quiet -e '.[server]'

install-test: $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'

install-bench: $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test,bench]'

## end to end: train → serve → upload → predict → restart → predict, printing each step
demo: install
	$(BIN)/leanserve demo

## the server on the embedded default repository (./models), port 8500
serve: install
	$(BIN)/leanserve serve

## the whole test suite (what CI runs)
test: install-test
	TF_CPP_MIN_LOG_LEVEL=3 $(BIN)/python -m pytest -q

## everything but the tests marked slow
test-fast: install-test
	TF_CPP_MIN_LOG_LEVEL=3 $(BIN)/python -m pytest -q -m "not slow"

## regenerate the protobuf/gRPC code committed under protos/ (tests/test_protos_fresh.py checks it)
protos: install-test
	$(BIN)/python -m grpc_tools.protoc -I protos --python_out=protos --pyi_out=protos --grpc_python_out=protos \
		$$(cd protos && find . -name '*.proto' | sed 's|^\./||' | sort)

bench-kernels: install-bench
	$(BIN)/python bench/kernels.py --quick

bench-predict: install-bench
	$(BIN)/python bench/predict.py --quick

clean:
	rm -rf $(VENV) build *.egg-info demo-output .pytest_cache
