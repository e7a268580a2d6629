"""Data utilities shared by the task families."""
