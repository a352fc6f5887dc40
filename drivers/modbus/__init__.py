"""Modbus TCP, RTU and RTU-over-TCP devices on shared buses."""
