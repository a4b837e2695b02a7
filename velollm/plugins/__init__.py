"""Built-in plugins. Each module is an ordinary plugin: the host registers it by name."""
