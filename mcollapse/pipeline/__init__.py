"""Steps that several experiments compose: sample selection, cached activations and adapter sequences,
the eigenbasis and gradient passes of the decoder side, and the skeleton of the mode-editing experiments."""
