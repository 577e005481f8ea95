"""The one compiled part of the package: sidecar._native (shared memory segments, CUDA IPC)."""
from glob import glob

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "sidecar._native",
            sources=sorted(glob("native/*.c")),
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
            libraries=["rt", "dl"],
        )
    ]
)
