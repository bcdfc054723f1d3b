"""Simulated hospitals: patients whose latent condition shows in every modality, driven
through the real device agent. :func:`generate_cohort` is the pure, in-process generator;
:mod:`simulators.records` and :mod:`simulators.payloads` build synthetic records and wire
messages (valid and forged) for tests and benchmarks."""
from simulators.cohort import SimPatient, generate_cohort, hospital_profile

__all__ = ["SimPatient", "generate_cohort", "hospital_profile"]
