"""Ray job entrypoints (recipes): each `python -m jobs.<name>` takes the same flags as `fetaliqa <name>`."""
