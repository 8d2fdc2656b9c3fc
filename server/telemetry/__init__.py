"""What a running server tells its operators: Prometheus metrics, garbage-collector pauses, JSON logs."""
