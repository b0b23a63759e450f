"""Command-line entry points: parse arguments, run a server on uvloop, print its address."""
