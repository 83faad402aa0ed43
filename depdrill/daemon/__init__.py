"""The daemon: continuous discovery, scheduled scans, history, drift and metrics."""
