"""The layer contract, conv geometry and padding, per-layer records, argument checks, timing:
what every other part of legofx builds on. Imports nothing else from legofx."""
