"""Writes to the fleet inventory: one function per change, named <entity>_<action>."""
