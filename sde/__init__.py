"""sde package (public names are added as modules land)."""
