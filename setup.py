"""Shim for Beam's --setup_file, which runs `python setup.py sdist` on the driver.

All metadata lives in setup.cfg.
"""
import setuptools

setuptools.setup()
