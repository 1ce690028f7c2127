"""The one compiled module: the fan-out's write loop (etherd/edge/ws/_directwrite.c).

Everything else about the package is in pyproject.toml.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "etherd.edge.ws._directwrite",
            sources=["etherd/edge/ws/_directwrite.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra"],
            # Without a C compiler etherd installs anyway and runs the loop in Python.
            optional=True,
        )
    ]
)
