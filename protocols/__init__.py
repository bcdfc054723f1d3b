"""Shared core of the system: typed messages and wire formats, topics, fixed-point and
secret-sharing maths, model architectures the cloud must know, errors and logging setup.

Every other package imports from here, never from each other.
"""
