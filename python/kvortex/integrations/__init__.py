"""Integrations of kvortex with inference libraries (import the submodule you need)."""
