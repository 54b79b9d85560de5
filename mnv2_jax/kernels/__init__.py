"""Hand-written XLA:CPU kernels (C++, XLA FFI), built on first use; the models select them through their config."""
