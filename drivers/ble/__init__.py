"""BLE sensors: passive advertisements (BTHome v2, Ruuvi DF5, ATC1441/pvvx) and GATT polling."""
