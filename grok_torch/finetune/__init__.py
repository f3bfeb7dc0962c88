"""Fine-tuning Grok-1 (issue #10). ``data``: read, tokenize, split, pack and serve resumable batches."""
from .data import (FORMATS, IGNORE_INDEX, CorpusStats, DataError, Document, PackedDataset, SplitStats,
                   detect_format, load_corpus, pack_documents, read_documents, split_documents)

__all__ = ["FORMATS", "IGNORE_INDEX", "CorpusStats", "DataError", "Document", "PackedDataset", "SplitStats",
           "detect_format", "load_corpus", "pack_documents", "read_documents", "split_documents"]
