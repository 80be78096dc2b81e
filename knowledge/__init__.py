"""Knowledge layer: ingestion, index backends and security-trimmed retrieval (see ``contracts``)."""
