"""Shared async serial plumbing for the serial protocol drivers (TIC, SDS011, PMS5003, MH-Z19, M-Bus)."""
