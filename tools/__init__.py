"""Tools layer: plugin API, registry and the execution policy every tool runs behind."""
