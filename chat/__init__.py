"""llama-mpi chat: the command line and the REPL on rank 0. Only chat/ talks to the human."""
