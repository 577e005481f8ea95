"""The compiled parts of the package, each a small C module with one job.

sidecar._native  : POSIX shared-memory segments (native/shm.c)
sidecar._cudaipc : CUDA IPC handles; loads libcuda.so.1 at run time, so it builds without CUDA (native/cuda_ipc.c)
"""
import os

from setuptools import Extension, setup

CFLAGS = ["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"]


def ext(name: str, source: str) -> Extension:
    return Extension(name, sources=[source], extra_compile_args=CFLAGS, libraries=["rt", "dl"])


exts = [ext("sidecar._native", "native/shm.c")]
if os.path.exists("native/cuda_ipc.c"):
    exts.append(ext("sidecar._cudaipc", "native/cuda_ipc.c"))

setup(ext_modules=exts)
