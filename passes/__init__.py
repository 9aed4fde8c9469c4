"""Compiler passes, one module each: prune, cluster, encode, lower (contract in eiec.passmanager)."""
