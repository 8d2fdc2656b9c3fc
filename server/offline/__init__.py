"""Read-only analysis of a decision log: log and statistics sources, reports, notebook helpers."""
