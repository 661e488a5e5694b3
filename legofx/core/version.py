"""The legofx version, and the layout of what it writes."""

VERSION = "0.2.0"
