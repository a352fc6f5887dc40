"""Winsen MH-Z19(B) NDIR CO2 sensor driver."""
