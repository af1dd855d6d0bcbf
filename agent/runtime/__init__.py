"""Model runtimes (llama.cpp, ONNX Runtime) behind the protocols in :mod:`agent.runtime.base`."""
