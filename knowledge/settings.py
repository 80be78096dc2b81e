"""Settings of the knowledge layer (``LAMINA_KNOWLEDGE__*``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, model_validator

from knowledge.contracts import SearchMode


class KnowledgeSettings(BaseModel):
    index_path: Path | None = Field(
        default=None, description="SQLite index file; default <data_dir>/knowledge.db"
    )
    chunk_tokens: int = Field(default=200, ge=32, le=2000, description="Target chunk size in words")
    chunk_overlap: int = Field(
        default=30, ge=0, le=500, description="Overlap between chunks, words"
    )
    top_k: int = Field(default=5, ge=1, le=50, description="Passages retrieved per query")
    max_file_mb: float = Field(default=50, gt=0, description="Larger files are skipped")
    acl_file_name: str = Field(default="acl.yaml", description="ACL file looked for at the root")
    embeddings: Literal["local", "hashing", "deployment"] = Field(
        default="local",
        description=(
            "Embedding model of the index and of queries: 'local' (all-MiniLM-L6-v2 int8, "
            "shipped in a package, offline), 'hashing' (tiny lexical fallback, offline), or "
            "'deployment' (the registry deployment named by embedding_deployment, e.g. Azure "
            "OpenAI text-embedding-3-small). Changing it needs a re-index."
        ),
    )
    embedding_deployment: str | None = Field(
        default=None, description="Registry deployment of the 'deployment' embeddings"
    )
    search_mode: SearchMode = Field(
        default=SearchMode.HYBRID,
        description="Default ranking: 'hybrid' (BM25 + vectors, fused), 'text' or 'vector'",
    )
    hybrid_fusion: Literal["score", "rrf"] = Field(
        default="score",
        description=(
            "How the embedded index fuses BM25 and vector lists in hybrid search: 'score' "
            "(standardised scores, weighted by hybrid_vector_share) or 'rrf' (Reciprocal "
            "Rank Fusion). Azure AI Search always fuses with RRF."
        ),
    )
    hybrid_vector_share: float = Field(
        default=0.6,
        ge=0,
        le=1,
        description="Weight of the vector list in 'score' fusion; BM25 has the rest",
    )
    backend: Literal["sqlite", "azure_search"] = Field(
        default="sqlite", description="Index backend: embedded SQLite, or Azure AI Search"
    )
    azure_search: AzureSearchSettings = Field(
        default_factory=lambda: AzureSearchSettings(),
        description="The Azure AI Search index, when LAMINA_KNOWLEDGE__BACKEND=azure_search",
    )
    pdf_parser: Literal["local", "document_intelligence"] = Field(
        default="local",
        description=(
            "How PDFs are parsed: 'local' (pypdf, a section per page, offline) or "
            "'document_intelligence' (Azure AI Document Intelligence layout: title, headings "
            "and tables, no page headers or footers; billed per page; needs "
            "lamina[document-intelligence]). Changing it re-indexes the PDFs."
        ),
    )
    document_intelligence: DocumentIntelligenceSettings = Field(
        default_factory=lambda: DocumentIntelligenceSettings(),
        description="The Document Intelligence resource, when pdf_parser=document_intelligence",
    )

    @model_validator(mode="after")
    def _document_intelligence_needs_endpoint(self) -> KnowledgeSettings:
        if self.pdf_parser == "document_intelligence" and not self.document_intelligence.endpoint:
            raise ValueError(
                "document_intelligence.endpoint is required when pdf_parser is "
                "document_intelligence: set LAMINA_KNOWLEDGE__DOCUMENT_INTELLIGENCE__ENDPOINT"
            )
        return self


class AzureSearchSettings(BaseModel):
    """``LAMINA_KNOWLEDGE__AZURE_SEARCH__*``: the Azure AI Search index backend. Without
    ``api_key`` the service is reached with Entra ID (managed identity in Azure)."""

    endpoint: str | None = Field(default=None, description="https://<service>.search.windows.net")
    index_name: str = Field(
        default="lamina-chunks", pattern=r"^[a-z0-9][a-z0-9-]{0,127}$", description="Index name"
    )
    api_key: SecretStr | None = Field(
        default=None, description="Admin key; unset: Entra ID (DefaultAzureCredential)"
    )
    semantic_ranker: bool = Field(
        default=False, description="Rerank hybrid results with the semantic ranker (billed)"
    )
    vector_weight: float = Field(
        default=1.0,
        gt=0,
        le=10,
        description=(
            "Weight of the vector query in the service's Reciprocal Rank Fusion of hybrid "
            "search; 1 weighs BM25 and vectors alike"
        ),
    )
    batch_size: int = Field(default=500, ge=1, le=1000, description="Documents per upload")
    max_retries: int = Field(
        default=5, ge=0, le=20, description="Retries of a throttled (429/503) request"
    )


class DocumentIntelligenceSettings(BaseModel):
    """``LAMINA_KNOWLEDGE__DOCUMENT_INTELLIGENCE__*``: the Azure AI Document Intelligence
    resource that parses PDFs when ``pdf_parser`` is ``document_intelligence``. Without
    ``api_key`` it is reached with Entra ID (managed identity in Azure)."""

    endpoint: str | None = Field(
        default=None,
        pattern=r"^https://[^\s/]+(/\S*)?$",
        description="https://<resource>.cognitiveservices.azure.com",
    )
    api_key: SecretStr | None = Field(
        default=None,
        description="Resource key; unset: Entra ID (DefaultAzureCredential, needs the "
        "'Cognitive Services User' role)",
    )
    model_id: str = Field(
        default="prebuilt-layout",
        pattern=r"^[a-zA-Z0-9][a-zA-Z0-9._~-]{1,63}$",
        description="Analysis model; prebuilt-layout finds titles, headings and tables",
    )
    timeout_s: float = Field(
        default=600,
        gt=0,
        le=3600,
        description="Longest wait for one PDF's analysis; a PDF not done by then is skipped",
    )
