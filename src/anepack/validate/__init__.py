"""Validators, recipes, the pre-flight gate, recipe search and run history."""
