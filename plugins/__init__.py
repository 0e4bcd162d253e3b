"""Built-in plugins, installed as ``pycontainerd.plugins``."""
