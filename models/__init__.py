"""Models for the recipes."""
