"""HTTP routes; thin: parse, authenticate, delegate to the intelligence layer."""
