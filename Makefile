# podplan: `make demo` and `make test` work on a fresh machine from nothing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | cksum | cut -d' ' -f1)
OUT    := out

.PHONY: all setup browser demo test plans diff-demo clean

all: test

$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	rm -f $(VENV)/.installed-*
	touch $@

setup: $(STAMP)

# The main job on a bundled model: trace DeepSeek-V3, compile it for CloudMatrix384, show the plan
# (text + self-contained HTML), then run the tiny golden plan on 8 local processes.
demo: $(STAMP)
	@mkdir -p $(OUT)
	$(VENV)/bin/podplan trace deepseek-v3
	$(VENV)/bin/podplan compile deepseek-v3 --topology cloudmatrix384 --mtp-accept 0.7 --loads zipf:1.2 -o $(OUT)/deepseek-v3.cloudmatrix384.json
	$(VENV)/bin/podplan show $(OUT)/deepseek-v3.cloudmatrix384.json --format text
	$(VENV)/bin/podplan show $(OUT)/deepseek-v3.cloudmatrix384.json --format html -o $(OUT)/deepseek-v3.cloudmatrix384.html
	$(VENV)/bin/podplan run plans/tiny-deepseek-v3.local-8.json

# Headless Chromium for the HTML view's browser test (Debian package; needs root, as on CI).
browser:
	@test -x /usr/bin/chromium || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

test: $(STAMP) browser
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15

# What CI shows a reviewer: a semantic diff of a changed plan (here: the golden DeepSeek-V3 plan
# re-planned after 8 decode devices fail), as the markdown table a CI comment would carry.
# `podplan diff` exits 1 on a regression, which this change is: only exit 2 (bad input) fails.
diff-demo: $(STAMP)
	@mkdir -p $(OUT)
	$(VENV)/bin/podplan replan plans/deepseek-v3.cloudmatrix384.json --failed-devices 0-7 -o $(OUT)/replanned.json
	$(VENV)/bin/podplan diff plans/deepseek-v3.cloudmatrix384.json $(OUT)/replanned.json --markdown || [ $$? -eq 1 ]

plans: $(STAMP)
	$(PY) -m planner.golden --write

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .hypothesis
