"""A replay of vLLM v0.16.0's scheduler and model runner around KVortexConnector.

It is not vLLM: it drives the connector through the calls vLLM makes, in vLLM's order, over real
paged caches (NumPy here, PyTorch on a GPU), with a stand-in model whose KV for a token is a
function of the tokens up to it, so every block a load restores is checked byte for byte against
what the producing run wrote. ``harness.py`` says which vLLM function each step mirrors.
"""
