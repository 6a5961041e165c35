"""MeiliES: an event-sourcing database that speaks the Redis protocol."""

__version__ = "0.1.0"
