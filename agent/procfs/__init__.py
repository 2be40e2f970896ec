"""Readers of /proc and cgroups shared by sources and pipeline: who a process is (identity.py,
with command-line redaction) and the two-level cache such identities are kept in (cache.py).
Imports nothing above the bottom layer (model, config)."""
