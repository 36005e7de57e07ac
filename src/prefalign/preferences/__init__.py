"""Preference data tools: automatic scorers (`scorers`) and merging files (`merge`)."""
