"""Operations the models are built from: attention backends, NAG, quantized and packed
linear layers, meta-device construction. Nothing here knows about files or placement."""
