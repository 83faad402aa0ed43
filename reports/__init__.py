"""The report stage: one self-contained HTML page (and JSON) per service from a run's results."""
