"""Simulated hospitals: patients whose latent condition shows in every modality, driven
through the real device agent."""
