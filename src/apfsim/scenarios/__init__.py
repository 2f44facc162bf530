"""Built-in scenario files (TOML)."""
