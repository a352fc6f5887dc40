"""Fault-injection suite: the real daemon against real peers, with faults injected (docs/RELIABILITY.md)."""
