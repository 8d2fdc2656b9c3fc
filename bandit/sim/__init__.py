"""Simulators that drive nextbest with synthetic but known worlds, so learning can be measured.

``scenario`` loads and validates a telecom CVM scenario, ``telecom`` simulates its customers
and their responses (and scores what other policies would have earned), ``bakeoff`` turns
supervised datasets into bandit streams and runs Vowpal Wabbit directly on them. None of them
talk to a server: ``server/cli/simulate.py`` does that.
"""
