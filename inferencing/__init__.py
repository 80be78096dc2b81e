"""Inferencing layer: chat and embedding models behind one contract (see ``contracts``)."""
