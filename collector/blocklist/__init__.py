"""The blocklist: consumers the plugins must stop, versioned, pushed to every collector."""
