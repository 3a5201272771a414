"""Only here because cffi has no declarative pyproject.toml support: wires in the C core."""

from setuptools import setup

setup(cffi_modules=["csrc/build_ffi.py:ffibuilder", "csrc/build_ffi.py:fastbuilder",
                      "csrc/build_ffi.py:stackbuilder"])
