"""Command-line programs: thin click layers over library functions."""
