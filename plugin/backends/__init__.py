"""Storage backends: filesystem primitives behind one protocol (see :mod:`.base`)."""
