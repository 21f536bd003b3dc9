"""`rower dashboard`."""
