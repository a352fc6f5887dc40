"""Shared async serial plumbing for the serial protocol drivers (TIC, SDS011, PMS5003, MH-Z19, M-Bus).

Not a driver (no line in agent/registry.py, no sample.yaml): the leading underscore keeps it out of the
drivers' namespace, where every other package is one protocol (tests/unit/test_driver_samples.py).
"""
