"""`rower sim`."""
