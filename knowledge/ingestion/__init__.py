"""Ingestion: parse documents, attach access rules, chunk and index them."""
