"""Ray start/connect and resource sizing."""
