# podplan: `make demo` and `make test` work on a fresh machine from nothing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | cksum | cut -d' ' -f1)
OUT    := out

.PHONY: all setup browser demo test plans bench clean

all: test

$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	rm -f $(VENV)/.installed-*
	touch $@

setup: $(STAMP)

demo: $(STAMP)
	@mkdir -p $(OUT)
	$(VENV)/bin/podplan trace deepseek-v3

# Headless Chromium for the HTML view's browser test (Debian package; needs root, as on CI).
browser:
	@test -x /usr/bin/chromium || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

test: $(STAMP) browser
	$(PY) -m pytest -q -n 2 --dist loadfile

plans: $(STAMP)
	$(PY) -m planner.golden --write

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .hypothesis
