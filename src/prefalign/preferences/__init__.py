"""Preference data tools: automatic scorers (scorers), merging files (merge), human annotation (annotate)."""
