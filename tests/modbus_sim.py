"""Test peer: the Modbus simulator of drivers/modbus/simulator.py; also `python -m tests.modbus_sim`."""

from drivers.modbus.simulator import ModbusSim, SimHandle, SimUnit, main, start_tcp_simulator

__all__ = ["ModbusSim", "SimHandle", "SimUnit", "main", "start_tcp_simulator"]

if __name__ == "__main__":
    main()
