"""The built-in demo: the sentiment task (`task`) and the whole pipeline on it (`pipeline`)."""

from prefalign.demo.pipeline import run_demo

__all__ = ["run_demo"]
