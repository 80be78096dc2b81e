"""Edge authentication: bearer JWTs (OpenID/JWKS) or, only when switched on, dev headers."""
