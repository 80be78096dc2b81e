"""Benchmarks: scripts that start what they need on loopback and print figures."""
