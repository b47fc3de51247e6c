# cffi has no pyproject.toml key for its build hook; everything else lives in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["native/build_ffi.py:ffibuilder"])
