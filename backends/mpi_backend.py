"""The MPI backend: the same program over mpi4py, launched with mpiexec.

Communicators: `rt.init_mesh(MESH, backend="mpi")` splits `MPI.COMM_WORLD` once per mesh
axis (`Comm.Split(color=first rank of the slice, key=coordinate)`); the runtime's
differentiable collectives run over those communicators on CPU tensors.

    >>> src = emit(sharded, model_name="GPT")                    # doctest: +SKIP
"""
from __future__ import annotations

from autopar.backends.codegen import Backend, EmitOptions, emit_program
from autopar.compiler.ir import Graph


class MpiBackend(Backend):
    def launch_command(self, file: str, world: int, extra: str = "") -> str:
        return f"OMP_NUM_THREADS=1 mpiexec -n {world} python {file} {extra}".rstrip()


MPI = MpiBackend(
    name="mpi", runtime="mpi",
    groups_comment=("Communicators: MPI.COMM_WORLD.Split(color=first rank of the slice, "
                    "key=coordinate) once per mesh axis, made by rt.init_mesh."),
    launcher="mpiexec (mpi4py; rank and size from MPI.COMM_WORLD)")


def emit(sharded: Graph, model_name: str, opts: EmitOptions = EmitOptions(),
         file_name: str = "program.py") -> str:
    """The mpi4py program for a sharded graph."""
    return emit_program(sharded, MPI, model_name, opts, file_name)


__all__ = ["MPI", "MpiBackend", "emit"]
