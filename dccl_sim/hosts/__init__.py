"""Hosts: the plain objects a Ray actor (or the in-process runtime) wraps. A host holds data, models and
per-device state and runs the strategy's steps on them; it knows no strategy by name (docs/architecture.md)."""
