"""The ``etherd`` command line: ``main.py`` parses, one module per group of commands acts."""
