# The two commands the README starts with. Both create .venv when it is missing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
DEMO    := build/demo

.PHONY: demo test clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# a regular (non-editable) install, as users get it; reinstalled when any source changes
SOURCES := $(shell find compiler passes runtime -name '*.py') pyproject.toml

$(VENV)/.installed: $(BIN)/python $(SOURCES)
	rm -rf build/lib build/bdist.* eiec.egg-info  # setuptools would reinstall removed modules from its stale copies
	$(BIN)/pip install --quiet --force-reinstall --no-deps .
	$(BIN)/pip install --quiet ".[test]"
	touch $@

demo: $(VENV)/.installed
	@mkdir -p $(DEMO)
	$(BIN)/eiec models/lenet5.onnx -o $(DEMO)/lenet5.eie --config models/lenet5_deep_compression.yaml \
		--calibration models/digits_calib.npz --dump-ir $(DEMO)/ir
	$(BIN)/eiec run $(DEMO)/lenet5.eie --input models/digits_test.npz -o $(DEMO)/out.npz --report $(DEMO)/report.json \
		--plot $(DEMO)/plots
	$(BIN)/eiec report $(DEMO)/report.json -o $(DEMO)/report.html
	$(BIN)/eiec validate models/lenet5.onnx $(DEMO)/lenet5.eie --input models/digits_test.npz --bisect $(DEMO)/ir

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build
