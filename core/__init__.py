"""llama-mpi core: GGUF loading, numpy quant kernels, the forward pass, tokenizers and the MPI pipeline.

Nothing in core/ prints to the user or imports chat/, prompt_toolkit or rich.
"""
