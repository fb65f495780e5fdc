from setuptools import setup

setup(cffi_modules=["dmb/_build.py:ffibuilder"])
