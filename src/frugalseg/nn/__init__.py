"""Networks with one contract: ``encode(x) -> features`` (fine to coarse), ``decode(features) -> (logits, decoder
features coarse to fine)``, ``forward(x) -> logits``."""
