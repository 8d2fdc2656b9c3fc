"""Configuration files: reading and checking apply files, plans of a change, export, the JSON Schema."""
