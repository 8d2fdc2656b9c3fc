"""The running service: Choose, reward windows, learner, writer, budgets, contacts, replication, configuration."""
