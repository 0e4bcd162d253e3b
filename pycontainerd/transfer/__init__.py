"""Moving images between registries and the daemon: its own pull (``Pull`` service)."""
