"""Index backends implementing ``knowledge.contracts.KnowledgeIndex``."""
