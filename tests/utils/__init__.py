"""Shared builders for the tests: free ports, a real Mosquitto, `iomt` subprocesses."""
