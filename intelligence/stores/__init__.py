"""Store adapters behind the intelligence layer's ports; only the composition root imports them."""
