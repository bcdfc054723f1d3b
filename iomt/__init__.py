"""Composition root: the `iomt` command line that starts every role of the system."""
