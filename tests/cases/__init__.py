"""Failure cases from other channel layers (CASES.md), one file per case."""
