"""Networks with one contract: ``encode(x) -> features`` (fine to coarse), ``decode(features) -> (logits, decoder
features coarse to fine)``, ``forward(x) -> logits``; attributes ``out_channels`` (classes), ``decoder_channels``
(width of each decoder feature, coarse to fine) and ``size_divisor`` (``forward`` pads the input to a multiple of
it and crops back; ``decode(encode(x))`` stays at the padded size, so methods that use decoder maps train on
patches that are multiples of it)."""
