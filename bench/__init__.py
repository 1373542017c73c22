"""A load benchmark: Vapora against a minimal fan-out server, on one machine."""
