"""Code generators (torch.distributed, MPI) and the runtime their programs import."""
