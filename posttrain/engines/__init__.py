"""Trainer glue over TRL's engines, and the evaluations that stages share."""
