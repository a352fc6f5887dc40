"""Wired M-Bus (EN 13757-2/-3) master driver for water and heat meters."""
