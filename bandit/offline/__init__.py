"""Offline evaluation of policies on a decision log: replay, estimators, DSJSON, experiment statistics."""
