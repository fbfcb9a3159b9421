"""The pure layer: stdlib and attrs only, no clock, no I/O."""
