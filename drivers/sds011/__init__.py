"""Nova SDS011 particulate-matter sensor driver (PM2.5, PM10)."""
