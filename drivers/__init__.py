"""fieldgate drivers: one package per protocol (config.py pydantic, codec.py pure, driver.py I/O)."""
