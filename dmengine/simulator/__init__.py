"""A fleet of virtual OMA DM devices (``dmengine simulate``).

``device.py`` is the device: a compact management tree and a sans-IO DM *client* engine
that answers server messages the way a phone does.  ``fleet.py`` drives many of them over
real HTTP (raw asyncio + httptools on uvloop) and receives package-0 notifications.
"""
from .device import ClientSession, DeviceProfile, FaultPlan, Job, VirtualDevice

__all__ = ["ClientSession", "DeviceProfile", "FaultPlan", "Job", "VirtualDevice"]
