"""Back down to the devices: commands, lamp schedules, remote configuration, the local API."""
