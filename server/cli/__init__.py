"""The ``nextbest`` command line."""
