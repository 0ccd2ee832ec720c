"""Neuron placement: which FFN neurons live on the GPU under a VRAM budget, and the ledger of that budget."""
from .ledger import CATEGORIES, DENSE_DTYPES, Ledger, LedgerItem, format_bytes, parse_budget, vram_ledger
from .placement import OBJECTIVES, Placement, PlacementProblem, greedy_placement, solve_placement
from .timing import Bandwidths, TokenModel

__all__ = ["Bandwidths", "CATEGORIES", "DENSE_DTYPES", "Ledger", "LedgerItem", "OBJECTIVES", "Placement",
           "PlacementProblem", "TokenModel", "format_bytes", "greedy_placement",
           "parse_budget", "solve_placement", "vram_ledger"]
