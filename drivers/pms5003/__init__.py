"""Plantower PMS5003 (PMSx003) particulate-matter sensor driver (PM1, PM2.5, PM10, counts)."""
