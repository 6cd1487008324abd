"""Offline data loaders and generators of the trainers."""
