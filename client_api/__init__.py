"""Client API layer: the FastAPI app, edge policies, CLI and the composition root."""
