"""Durable storage of DICOM instances: Part 10 files on disk and the SQL index.

Knows nothing of networks: the gateway package calls it, never the reverse.
"""
