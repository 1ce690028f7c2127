"""Coverage-guided fuzz targets (atheris), one module per input surface.

Each target runs as ``python -m tests.fuzz.<name> [libFuzzer flags] [corpus dirs]``; seeds
live in ``corpus/<name>/``. ``make fuzz`` runs them all for a while, ``test_fuzz.py`` runs
each briefly inside ``make test``. This package imports nothing from etherd, so a target's
``atheris.instrument_imports()`` block is what first imports (and instruments) it.
"""
