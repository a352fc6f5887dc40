"""Sunrise and sunset instants for a place and a date (NOAA solar calculator equations), for lamp schedules.

The equations are those of the NOAA Global Monitoring Laboratory's solar
calculator (after Jean Meeus, "Astronomical Algorithms"): the sun's apparent
longitude, declination and the equation of time from the Julian century, then
the hour angle at which the sun's centre is 0.833° below the horizon (34' of
refraction plus the 16' semi-diameter: the upper limb touches a sea-level
horizon). NOAA states the results are good to about a minute between ±72°
latitude; elevation, temperature and pressure are ignored, as every published
table does. Written here rather than pulled in as a dependency: sixty lines,
no data files, and the gateway needs nothing else from astronomy.
"""

from __future__ import annotations

import math
from datetime import UTC, date, datetime, timedelta
from typing import Literal

SunEvent = Literal["sunrise", "sunset"]

# 90° + 50': standard refraction (34') and the sun's semi-diameter (16').
ZENITH_OFFICIAL = 90.833

_J2000 = 2451545.0


def _julian_day(day: date) -> float:
    """Julian day at 00:00 UTC of a Gregorian date."""
    return day.toordinal() + 1721424.5


def _sun(jd: float) -> tuple[float, float]:
    """(declination in degrees, equation of time in minutes) at Julian day `jd`."""
    t = (jd - _J2000) / 36525.0  # Julian centuries since J2000.0
    l0 = (280.46646 + t * (36000.76983 + t * 0.0003032)) % 360.0  # geometric mean longitude
    m = 357.52911 + t * (35999.05029 - 0.0001537 * t)  # mean anomaly
    e = 0.016708634 - t * (0.000042037 + 0.0000001267 * t)  # orbit eccentricity
    mr = math.radians(m)
    centre = (
        math.sin(mr) * (1.914602 - t * (0.004817 + 0.000014 * t))
        + math.sin(2 * mr) * (0.019993 - 0.000101 * t)
        + math.sin(3 * mr) * 0.000289
    )
    omega = math.radians(125.04 - 1934.136 * t)
    apparent_long = math.radians(l0 + centre - 0.00569 - 0.00478 * math.sin(omega))
    mean_obliquity = 23.0 + (26.0 + (21.448 - t * (46.815 + t * (0.00059 - t * 0.001813))) / 60.0) / 60.0
    obliquity = math.radians(mean_obliquity + 0.00256 * math.cos(omega))
    declination = math.degrees(math.asin(math.sin(obliquity) * math.sin(apparent_long)))
    y = math.tan(obliquity / 2) ** 2
    l0r = math.radians(l0)
    eq_time = 4.0 * math.degrees(
        y * math.sin(2 * l0r)
        - 2 * e * math.sin(mr)
        + 4 * e * y * math.sin(mr) * math.cos(2 * l0r)
        - 0.5 * y * y * math.sin(4 * l0r)
        - 1.25 * e * e * math.sin(2 * mr)
    )
    return declination, eq_time


def _event_minutes(
    jd: float, latitude: float, longitude: float, event: SunEvent, zenith: float
) -> float | None:
    """Minutes after 00:00 UTC of the event, with the sun's position taken at Julian day `jd`."""
    declination, eq_time = _sun(jd)
    lat, dec = math.radians(latitude), math.radians(declination)
    cos_ha = math.cos(math.radians(zenith)) / (math.cos(lat) * math.cos(dec)) - math.tan(lat) * math.tan(dec)
    if not -1.0 <= cos_ha <= 1.0:
        return None  # polar day or night: the sun does not cross that altitude today
    hour_angle = math.degrees(math.acos(cos_ha))
    noon = 720.0 - 4.0 * longitude - eq_time
    return noon - 4.0 * hour_angle if event == "sunrise" else noon + 4.0 * hour_angle


def sun_event(
    day: date, latitude: float, longitude: float, event: SunEvent, zenith: float = ZENITH_OFFICIAL
) -> datetime | None:
    """The UTC instant of sunrise or sunset on `day` (the UTC date closest to the local one), or None.

    `longitude` is positive east. None means the sun does not rise or set that
    day at that latitude. Two passes: the sun's position is first taken at
    local noon, then again at the first estimate of the event, which brings
    the error of the first pass (up to a minute near the equinoxes) down to
    seconds.
    """
    jd0 = _julian_day(day)
    minutes = _event_minutes(jd0 + 0.5 - longitude / 360.0, latitude, longitude, event, zenith)
    if minutes is None:
        return None
    refined = _event_minutes(jd0 + minutes / 1440.0, latitude, longitude, event, zenith)
    if refined is not None:
        minutes = refined
    return datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(minutes=minutes)
