"""Picket's API messages (package ``picket.v1``), generated from ``proto/`` at build time."""
