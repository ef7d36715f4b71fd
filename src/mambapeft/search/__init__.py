"""HybridPEFT search (paper Section 3.4, Algorithm 1): which methods to combine, and with which settings."""

from .hybrid import SearchResult, SearchSettings, run_search
from .space import SearchSpace, paper_space

__all__ = ["SearchResult", "SearchSettings", "SearchSpace", "paper_space", "run_search"]
