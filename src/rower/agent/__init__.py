"""`rower agent`."""
