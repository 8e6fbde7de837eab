"""Independent re-implementations of official evaluation code, used as test oracles."""
